"""What a transformers user gets from a saved checkpoint (its tokenizer above all), as JSON. Run by
tests/test_interop.py in a subprocess, under the transformers being checked (4 or 5), so that
nothing of this project is imported here:

    python tests/hf_client.py CHECKPOINT DIALOGUES.json [--slow]

DIALOGUES.json: a list of dialogues, each a list of utterances (user, assistant, ...).
--slow: transformers 4's sentencepiece LlamaTokenizer instead of AutoTokenizer.
"""

import json
import logging
import sys
import warnings


def main():
    checkpoint, dialogues_file = sys.argv[1], sys.argv[2]
    import transformers

    logged = []  # what transformers logs at warning level or above while loading
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    transformers.logging.get_logger("transformers").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls = transformers.LlamaTokenizer if "--slow" in sys.argv else transformers.AutoTokenizer
        tok = cls.from_pretrained(checkpoint)
        generation = transformers.GenerationConfig.from_pretrained(checkpoint)
        transformers.AutoModelForCausalLM.from_pretrained(checkpoint)

    with open(dialogues_file) as f:
        dialogues = json.load(f)
    chats = []
    for turns in dialogues:
        messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        ids = tok.apply_chat_template(messages, tokenize=True)
        chats.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    try:
        tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"}], tokenize=False)
        system = None
    except Exception as e:  # jinja2's TemplateError, or what raise_exception raised
        system = str(e)
    print(json.dumps({
        "version": transformers.__version__, "class": type(tok).__name__,
        "warnings": [str(w.message) for w in caught] + logged,
        "chat_ids": chats, "eot_id": tok.convert_tokens_to_ids("<|eot_id|>"),
        "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in chats],
        "plain_ids": tok("hello world")["input_ids"], "system_refused": system,
        "generation": generation.to_diff_dict()}))


if __name__ == "__main__":
    main()
