"""What llama.cpp makes of a GGUF converted from a saved checkpoint, printed as JSON. Run by
tests/test_interop.py in a subprocess, under a Python with llama-cpp-python (llama.cpp's library
and its chat handling) and gguf, so that nothing of this project is imported here:

    python tests/llama_cpp_client.py MODEL.gguf DIALOGUES.json PROMPTS.json

DIALOGUES.json: dialogues (lists of utterances) to put through the GGUF's chat template and
tokenize as llama-cpp-python's create_chat_completion does; PROMPTS.json: token-id prompts
whose logits (every position) to report.
"""

import json
import sys


def main():
    path, dialogues_file, prompts_file = sys.argv[1:4]
    import gguf
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    reader = gguf.GGUFReader(path)

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    # an f32 KV cache (its default is f16), so that the logits compare at float32 precision
    llm = llama_cpp.Llama(path, n_ctx=0, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    vocab = llm._model.vocab
    bos, eos, eot = llm.token_bos(), llm.token_eos(), llm._model.token_eot()

    # the prompt of create_chat_completion: the GGUF's template rendered, then tokenized with
    # special tokens parsed (llama_chat_format.chat_formatter_to_chat_completion_handler)
    template = field("tokenizer.chat_template")
    formatter = Jinja2ChatFormatter(template=template, eos_token=tokens[eos], bos_token=tokens[bos],
                                    stop_token_ids=[eos])
    with open(dialogues_file) as f:
        dialogues = json.load(f)
    chats = []
    for turns in dialogues:
        result = formatter(messages=[{"role": ("user", "assistant")[i % 2], "content": t}
                                     for i, t in enumerate(turns)])
        chats.append(llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special,
                                  special=True))

    with open(prompts_file) as f:
        prompts = json.load(f)
    logits = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        logits.append(llm.scores[:len(prompt)].tolist())  # (positions, vocabulary)

    completion = llm.create_chat_completion(messages=[{"role": "user", "content": dialogues[0][0]}],
                                            max_tokens=8, temperature=0.0)
    print(json.dumps({
        "chat_template": template, "bos": bos, "eos": eos, "eot": eot,
        "eot_text": tokens[eot] if eot >= 0 else None, "eot_type": int(types[eot]) if eot >= 0 else None,
        "eog": [i for i in range(len(tokens)) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "chat_ids": chats, "logits": logits,
        "finish_reason": completion["choices"][0]["finish_reason"],
        "completion_tokens": completion["usage"]["completion_tokens"]}))


if __name__ == "__main__":
    main()
