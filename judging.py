"""The paper's judges: the questions put to people and to judge models, and how an answer is
read back into a verdict (LIMA §4, §5, Appendices C and D).

A judge is any callable: list of question texts -> list of answer texts. Tests script one;
ModelJudge runs a local LIMA-format checkpoint. A judge may also offer `budget`, `n_tokens` and
`trim`, so answers too long for its context are cut (keeping their start) instead of failing.
"""

import os
import random
import re

import checkpoint
import config
from generate import respond

# LIMA Appendix C, verbatim: what the annotators and GPT-4 were asked.
PAIRWISE_QUESTION = (
    "Imagine that you have a super-intelligent AI assistant, and that you require help with the "
    "following question. Which answer best satisfies your needs?\n"
    "Question: {prompt}\n"
    "Answer A: {answer_a}\n"
    "Answer B: {answer_b}\n"
    "Comparing these two answers, which answer is better?\n"
    "- Answer A is significantly better.\n"
    "- Answer B is significantly better.\n"
    "- Neither is significantly better.")

# LIMA Appendix D, the ChatGPT helpfulness prompt of the §5 ablations, verbatim (its typos
# included; typographic quotes as ASCII). The judge reasons, then ends on the score alone.
HELPFULNESS_PROMPT = """You are evaluating a response that has been submitted for a particular task, using a specific set of standards. Below is the data:
[BEGIN DATA]
***
[Task]: {task}
***
[Submission]: {submission}
***
[Criterion]: helpfulness:
"1": "Not helpful - The generated text is completely irrelevant, unclear, or incomplete. It does not provide any useful information to the user."
"2": "Somewhat helpful - The generated text has some relevance to the user's question, but it may be unclear or incomplete. It provides only partial information, or the information provided may not be useful for the user's needs."
"3": "Moderately helpful - The generated text is relevant to the user's question, and it provides a clear and complete answer. However, it may lack detail or explanation that would be helpful for the user."
"4": "Helpful - The generated text is quite relevant to the user's question, and it provides a clear, complete, and detailed answer. It offers additional information or explanations that are useful for the user. However, some of the points of the response are somewhat repetitive or could be combined for greater clarity and concision"
"5": "Very helpful - The generated text is highly relevant to the user's question, and it provides a clear, complete, and detailed answer. It offers additional information, explanations, or analogies that are not only useful but also insightful and valuable to the user. However, the structured of the response is not well-organized and there is no clear progression or logical sequence of different points in the response."
"6": "Highly helpful - The generated text provides a clear, complete, and detailed answer. It offers additional information or explanations that are not only useful but also insightful and valuable to the user. The response is also in a logical and easy-to-follow manner by explicitly using headings, bullet points, or numbered lists to break up the information and make it easier to read."
***
[END DATA]
Does the submission meet the criterion? First, write out in a step by step manner your reasoning about the criterion to be sure that your conclusion is correct. Avoid simply stating the correct answers at the outset. Then print the choice only from "1, 2, 3, 4, 5, 6" (without quotes or punctuation) on its own line corresponding to the correct answer. At the end, repeat just the selected choice again by itself on a new line."""

LABELS = ("a", "tie", "b")  # in terms of the files; "skip" (a person passed) and None (unparseable) are not outcomes


# A verdict is one of the question's three option sentences (LIMA Appendix C), as a sentence of
# its own. So "Neither answer A nor answer B is significantly better." is not B (its tail is an
# option, the sentence is not), "Answer B is significantly worse." is nothing, and neither is
# "Answer A is significantly better than B, but...": unparseable, and counted as such.
VERDICTS = {"answer a is significantly better": "A", "answer b is significantly better": "B",
            "neither is significantly better": "tie"}
_VERDICT = re.compile(r"(?:(?:-|\u2022|\d+)\s+)?(" + "|".join(VERDICTS) + ")")  # a list marker allowed
_SENTENCE_END = re.compile(r"[.!?:;\n]")
_DECORATION = re.compile(r"[*_`#>\"'\u201c\u201d\u2018\u2019\[\]()]")  # markdown, quotes, brackets


def parse_preference(text):
    """The judge's text -> "A", "B", "tie" (as displayed) or None when unparseable.

    The text is cut into sentences at full stops, colons and line ends; a sentence that is
    exactly one of the three options (case, markdown, quotes, brackets and spacing aside) is a
    verdict. Verdicts that agree count once; two different ones are a conflict: None, never a
    guess (a judge that repeats the three options has not chosen)."""
    plain = _DECORATION.sub(" ", text or "").lower()
    labels = set()
    for sentence in _SENTENCE_END.split(plain):
        v = _VERDICT.fullmatch(" ".join(sentence.split()))
        if v:
            labels.add(VERDICTS[v.group(1)])
    return labels.pop() if len(labels) == 1 else None


def parse_score(text):
    """LIMA Appendix D: reasoning, then the score alone on the last line. -> 1..6 or None."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    m = re.fullmatch(r"[\W_]*(?:(?:score|rating|choice|answer|helpfulness)\s*[:=]?\s*)?([1-6])"
                     r"(?:\s*(?:/|out of)\s*6)?[\W_]*", lines[-1].strip(), re.IGNORECASE)
    return int(m.group(1)) if m else None


def undo_order(shown, order):
    """A label as displayed ("A"/"B") -> the file it came from ("a"/"b"). order "AB" means
    file a's answer was shown as Answer A; "BA" means it was shown as Answer B."""
    if shown not in ("A", "B"):
        return shown  # "tie", "skip", None
    return "a" if (shown == "A") == (order == "AB") else "b"


def shown_answers(pair, order):
    return (pair.answer_a, pair.answer_b) if order == "AB" else (pair.answer_b, pair.answer_a)


def pairwise_items(pairs, seed, both_orders):
    """-> [(pair, order)]. Each prompt's order is drawn from (seed, prompt key) alone, so a
    resumed or repeated run shows every pair exactly as before (LIMA §4: order randomised)."""
    items = []
    for p in pairs:
        first = "AB" if random.Random(f"{seed}:{p.key}").random() < 0.5 else "BA"
        items.append((p, first))
        if both_orders:
            items.append((p, "BA" if first == "AB" else "AB"))
    return items


HUMAN_KEYS = {"a": "A", "b": "B", "t": "tie", "s": "skip"}


def human_view(pair, order, progress):
    """The paper's question, word for word, laid out for reading: each answer in its own block
    and the three options keyed a / b / t."""
    answer_a, answer_b = shown_answers(pair, order)
    intro, rest = PAIRWISE_QUESTION.split("\nQuestion:")
    options = rest.split("\n")[-4:]  # "Comparing ...?" and the three options
    where = " | ".join(x for x in (pair.source and f"source {pair.source}",
                                   pair.id is not None and f"id {pair.id}") if x)
    rule = "-" * 30
    return "\n".join([f"\n{'=' * 30} {progress} {where} {'=' * 30}", intro, "", "Question:", pair.prompt, "",
                      f"{rule} Answer A {rule}", answer_a, "", f"{rule} Answer B {rule}", answer_b, "",
                      options[0]] + [f"  [{k}] {o[2:]}" for k, o in zip("abt", options[1:])] +
                     ["  [s] skip this pair   [q] save and quit (rerun the same command to go on)"])


# ---- judge models ------------------------------------------------------------------------------

TOO_LONG = "[not asked: the question does not fit the judge's context]"


class ModelJudge:
    """A local checkpoint as the judge: the question is one user turn in LIMA's chat format
    (BOS question EOT, generate.respond), the reply is decoded greedily until EOT."""

    def __init__(self, model, tokenizer, max_new_tokens=256, batch_size=8):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.max_seq_len = model.args.max_seq_len
        self.budget = self.max_seq_len - max_new_tokens - 2  # question tokens left besides BOS, EOT

    def n_tokens(self, text):
        return len(self.tokenizer.encode(text))

    def trim(self, text, n):
        ids = self.tokenizer.encode(text)
        return text if len(ids) <= n else self.tokenizer.decode(ids[:n]) + " [...]"

    def __call__(self, questions):
        # fit_question trims answers; only a prompt that alone overflows the context is left.
        # It gets a reply that parses as nothing, so it is counted, not silently dropped.
        asked = [i for i, q in enumerate(questions) if self.n_tokens(q) <= self.budget]
        replies = [TOO_LONG] * len(questions)
        # greedy, no repetition penalty: a judge should be deterministic, not creative
        answers = respond(self.model, self.tokenizer, [[questions[i]] for i in asked],
                          batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                          max_seq_len=self.max_seq_len, temperature=0.0, repetition_penalty=1.0)
        for i, answer in zip(asked, answers):
            replies[i] = answer
        return replies


def load_model_judge(path, tokenizer=None, device="auto", dtype="auto", max_new_tokens=256,
                     batch_size=8):
    """A fine-tuned checkpoint as a ModelJudge; ValueError / FileNotFoundError with a message
    for anything a user can get wrong."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--judge {path}: not 'human' and no checkpoint there")
    device = config.resolve_device(device)
    model, tok = checkpoint.load_model_and_tokenizer(
        path, tokenizer_path=tokenizer, dtype=config.resolve_dtype(dtype, device), device=device)
    if model.args.vocab_size <= tok.eot_id:
        raise ValueError(f"--judge {path}: a base model (no end-of-turn token); the judge answers "
                         f"in LIMA's chat format, so it must be a fine-tuned checkpoint")
    model.requires_grad_(False).eval()
    return ModelJudge(model, tok, max_new_tokens, batch_size)


def fit_question(make, judge, **answers):
    """make(**answers) -> the question. If it does not fit the judge's context, the longest
    answers are trimmed first, each keeping its start (as LIMA §3 trims long texts), so a
    long answer is judged on its beginning rather than crashing the run. -> (question, trimmed?)"""
    text = make(**answers)
    budget = getattr(judge, "budget", None)
    if budget is None or judge.n_tokens(text) <= budget:
        return text, False
    room = budget - judge.n_tokens(make(**{k: "" for k in answers})) - 4 * len(answers)  # 4: " [...]"
    sizes = sorted(judge.n_tokens(v) for v in answers.values())
    used, cap = 0, room // len(sizes)
    for i, size in enumerate(sizes):  # water-filling: short answers stay whole, their room goes to the rest
        cap = (room - used) // (len(sizes) - i)
        if size > cap:
            break
        used += size
    cap = max(cap, 1)
    return make(**{k: judge.trim(v, cap) for k, v in answers.items()}), True


