"""The paper's judges: the questions put to people and to judge models, and how an answer is
read back into a verdict (LIMA §4, §5, §6, Appendices C and D).

A judge is any callable: list of question texts -> list of answer texts. Tests script one;
ModelJudge runs a local LIMA-format checkpoint; APIJudge asks a model over the OpenAI
chat-completions protocol (GPT-4 and ChatGPT, the paper's judges, or a local vLLM or llama.cpp
server). A judge may also offer `budget`, `n_tokens` and `trim`, so answers too long for its
context are cut (keeping their start) instead of failing, and `batch_size`, the questions it
takes at a time. An answer may be a Reply, a str that also carries what the server reported
(`meta`: token usage), which is recorded with the judgement.
"""

import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor

import checkpoint
import config
import data
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

# LIMA §6 grades every response of its dialogues Fail, Pass or Excellent, the three grades its
# §4.3 analysis defines: the response did not meet the requirements of the prompt; met them; was
# an excellent response to the prompt. The paper gives no judge prompt for this grading: this one
# is ours. It states the three grades in those words and, as the paper's helpfulness prompt
# (Appendix D) does, asks for reasoning first and the grade alone on the last line.
DIALOGUE_QUESTION = """You are grading one response of an AI assistant in a conversation with a user. Below is the data:
[BEGIN DATA]
***
[Conversation so far]:
{context}
***
[User]: {prompt}
***
[Response]: {response}
***
[END DATA]
Grade the response, in the context of the conversation, with one of three grades:
Fail: the response does not meet the requirements of the user's message.
Pass: the response meets the requirements of the user's message.
Excellent: the response is an excellent response to the user's message.
First, write out in a step by step manner your reasoning about the grade. Then print the grade only, Fail, Pass or Excellent, on its own line at the end."""

NO_CONTEXT = "(none: this is the user's first message)"

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


GRADES = ("fail", "pass", "excellent")  # LIMA §6, worst first; "skip" and None are not grades


def parse_grade(text):
    """The judge's text -> "fail", "pass", "excellent", or None: the grade alone on the last
    line, as the dialogue question asks (case, markdown, quotes, a "Grade:" label and a full stop
    aside). A grade anywhere else is not read: reasoning often names all three."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    m = re.fullmatch(r"[\W_]*(?:grade\s*[:=]?\s*)?(fail|pass|excellent)[\W_]*", lines[-1].strip(), re.IGNORECASE)
    return m.group(1).lower() if m else None


def render_context(turns):
    """The turns of a conversation before the user's message, each with its role."""
    if not turns:
        return NO_CONTEXT
    return "\n\n".join(f"{'User' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


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


HUMAN_KEYS = {"a": "A", "b": "B", "t": "tie", "s": "skip"}  # what a person types -> the label as shown


def pairwise_parts():
    """The paper's pairwise question (Appendix C), word for word, cut where a page lays it out:
    the words before the question, the question asked after the answers, and its three options
    keyed a / b / t. -> (intro, ask, [(key, option)])"""
    intro, rest = PAIRWISE_QUESTION.split("\nQuestion:")
    ask, *options = rest.split("\n")[-4:]  # "Comparing ...?" and the three "- ..." options
    return intro, ask, [(k, o[2:]) for k, o in zip("abt", options)]


def human_view(pair, order, progress):
    """The paper's question, word for word, laid out for reading: each answer in its own block
    and the three options keyed a / b / t."""
    answer_a, answer_b = shown_answers(pair, order)
    intro, ask, options = pairwise_parts()
    where = " | ".join(x for x in (pair.source and f"source {pair.source}",
                                   pair.id is not None and f"id {pair.id}") if x)
    rule = "-" * 30
    return "\n".join([f"\n{'=' * 30} {progress} {where} {'=' * 30}", intro, "", "Question:", pair.prompt, "",
                      f"{rule} Answer A {rule}", answer_a, "", f"{rule} Answer B {rule}", answer_b, "",
                      ask] + [f"  [{k}] {o}" for k, o in options] +
                     ["  [s] skip this pair   [q] save and quit (rerun the same command to go on)"])


GRADE_KEYS = {"f": "fail", "p": "pass", "e": "excellent", "s": "skip"}


def grade_parts():
    """The three grades as the dialogue question defines them (LIMA §6), keyed f / p / e.
    -> (ask, [(key, definition)])"""
    definitions = DIALOGUE_QUESTION.split("one of three grades:\n")[1].splitlines()[:3]
    return ("Grade the response, in the context of the conversation:",
            [(line[0].lower(), line) for line in definitions])


def human_grade_view(turn, progress):
    """One response of a dialogue laid out for a person to grade: the conversation so far, the
    user's message, the response, and the three grades keyed f / p / e (LIMA §6)."""
    where = " | ".join(x for x in (f"dialogue {turn['dialogue']}, turn {turn['turn']}",
                                   turn.get("source") and f"source {turn['source']}") if x)
    rule = "-" * 30
    ask, grades = grade_parts()
    return "\n".join([f"\n{'=' * 30} {progress} {where} {'=' * 30}", "The conversation so far:",
                      render_context(turn["context"]), "", f"User: {turn['prompt']}", "",
                      f"{rule} Response {rule}", turn["response"], "", ask] +
                     [f"  [{k}] {line}" for k, line in grades] +
                     ["  [s] skip this response   [q] save and quit (rerun the same command to go on)"])


# ---- judgement files ---------------------------------------------------------------------------
# Every judgement is one JSON line, appended the moment it is made (data.Appender): the terminal
# sessions of evaluate.py and the browser study (annotate.py) write the same records through these
# functions. A person may change an earlier label (the browser's "back"): the new record is
# appended and supersedes the old one, which stays in the file as history. Whoever reads a file
# takes the last record of each item (`latest`); files written in one pass hold one per item.

def pairwise_meta(judge, seed, a, b):
    """What every pairwise judgement records besides its item: who judged, the seed of the A/B
    orders and the two generation files (by name), so a resumed session must match them."""
    return {"judge": judge, "seed": seed, "a": _basename(a), "b": _basename(b)}


def dialogue_meta(judge, gen):
    return {"judge": judge, "gen": _basename(gen)}


def _basename(path):
    return os.path.basename(os.path.normpath(path)) if path else path


def pair_record(pair, order, raw, label, meta, **extra):
    """A pairwise judgement: label is in terms of the files ("a", "b", "tie"; "skip"; None when
    a judge's answer is unparseable), raw what the judge said or the key the person pressed."""
    return {"id": pair.id, "source": pair.source, "prompt": pair.prompt, "order": order,
            "raw": raw, "label": label, **meta, **extra}


def grade_record(turn, raw, grade, meta, **extra):
    """A dialogue grade (LIMA §6): "fail", "pass", "excellent"; "skip"; None when unparseable."""
    return {"dialogue": turn["dialogue"], "turn": turn["turn"], "source": turn.get("source"),
            "prompt": turn["prompt"], "raw": raw, "grade": grade, **meta, **extra}


_ITEM_FIELDS = ("judge", "a", "b", "gen", "id", "order", "sample", "dialogue", "turn")


def item_of(record):
    """What a record judges, by whom: two records with the same item_of label the same thing (a
    later one is a changed label). Prompts without an id are told apart by their text."""
    same_prompt = (None if record.get("id") is not None or record.get("dialogue") is not None
                   else data.prompt_key(None, record.get("prompt") or "", False))
    return json.dumps([record.get(f) for f in _ITEM_FIELDS] + [same_prompt], sort_keys=True, default=str)


def latest(records):
    """The last record of each item, in the order the items were first judged."""
    last = {}
    for r in records:
        last[item_of(r)] = r  # a re-assigned key keeps its first position in the dict
    return list(last.values())


class OtherSettingsError(data.DataError):
    """A judgement file holds records made with other settings than the session's."""


def read_previous(path, expect, what, fix="rerun with the same settings, or another --out"):
    """The records already in a judgement file we append to (a torn last line is cut off), the
    last of each item; records made with other settings (`expect`: field -> value) are an
    OtherSettingsError, not silently mixed in."""
    if not os.path.exists(path):
        return []
    rows = data.read_jsonl(path, repair_tail=True)
    for n, row in rows:
        for name, value in expect.items():
            if row.get(name) != value:
                raise OtherSettingsError(f"{path}:{n}: this file holds {what} made with {name}={row.get(name)!r}, "
                                     f"not {value!r} as now; {fix}")
    return latest(row for _, row in rows)


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
        raise FileNotFoundError(f"--judge {path}: not 'human', not 'openai:MODEL', and no checkpoint there")
    device = config.resolve_device(device)
    model, tok = checkpoint.load_model_and_tokenizer(
        path, tokenizer_path=tokenizer, dtype=config.resolve_dtype(dtype, device), device=device)
    if model.args.vocab_size <= tok.eot_id:
        raise ValueError(f"--judge {path}: a base model (no end-of-turn token); the judge answers "
                         f"in LIMA's chat format, so it must be a fine-tuned checkpoint")
    model.requires_grad_(False).eval()
    return ModelJudge(model, tok, max_new_tokens, batch_size)


class JudgeError(Exception):
    """A judge that cannot be reached or refuses to judge: one message, what to do."""


class Reply(str):
    """A judge's answer text, with what the server reported about it in `meta` (token usage, the
    model that answered), recorded with the judgement."""

    def __new__(cls, text, meta=None):
        reply = super().__new__(cls, text)
        reply.meta = meta or {}
        return reply


OPENAI = "openai:"  # --judge openai:MODEL


class APIJudge:
    """A judge reached over the OpenAI chat-completions protocol: GPT-4, as in the paper's
    pairwise study (LIMA §4), ChatGPT as in its ablations (§5), or any server speaking the same
    protocol (vLLM, llama.cpp's server). The official `openai` client does the talking and reads
    the server and the key as it always does: OPENAI_BASE_URL (default
    https://api.openai.com/v1) and OPENAI_API_KEY. It retries rate limits (429), server errors
    (5xx), timeouts and dropped connections `retries` times with exponential backoff, honouring
    the server's Retry-After. Each question is one user message, answered at temperature 0 (a
    judge should be repeatable, not creative); `concurrency` questions are in flight at once."""

    def __init__(self, model, max_tokens=256, concurrency=8, retries=5, timeout=600.0):
        try:
            import openai
        except ImportError:
            raise JudgeError("--judge openai:MODEL needs the openai package, the official client of "
                             "the chat-completions protocol (optional for this project): "
                             "pip install openai") from None
        if not model:
            raise JudgeError("--judge openai:MODEL: name the model, e.g. openai:gpt-4")
        self.openai, self.model, self.max_tokens = openai, model, max_tokens
        self.concurrency = self.batch_size = concurrency
        self.retries = retries
        try:
            self.client = openai.OpenAI(max_retries=retries, timeout=timeout)
        except openai.OpenAIError as e:  # no key in the environment
            raise JudgeError(f"--judge {OPENAI}{model}: {e} A local server that checks no key takes "
                             f"any value (OPENAI_API_KEY=EMPTY).") from None
        self.base_url = str(self.client.base_url).rstrip("/")
        self.limit = "max_tokens"  # servers that refuse it (OpenAI's reasoning models) get the other

    def ask(self, question):
        o = self.openai
        try:
            r = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": question}], temperature=0,
                **{self.limit: self.max_tokens})
        except o.BadRequestError as e:
            message = _server_message(e)
            if self.limit == "max_tokens" and "max_completion_tokens" in message:
                self.limit = "max_completion_tokens"
                return self.ask(question)
            if re.search(r"context[ _](length|size|window)|too long|too many tokens|maximum.*length", message,
                         re.IGNORECASE):
                # one question too long for the judge: counted as not asked, as ModelJudge does
                return Reply(TOO_LONG, {"refused": message})
            raise JudgeError(f"{self.base_url} refused the request (HTTP 400: {message})") from None
        except (o.AuthenticationError, o.PermissionDeniedError) as e:
            raise JudgeError(f"{self.base_url} refused the key (HTTP {e.status_code}: {_server_message(e)}); "
                             f"set OPENAI_API_KEY to a key it accepts") from None
        except o.NotFoundError as e:
            raise JudgeError(f"{self.base_url}: no model {self.model!r} there (HTTP 404: {_server_message(e)}); "
                             f"check --judge {OPENAI}MODEL and OPENAI_BASE_URL") from None
        except o.APIConnectionError as e:  # timeouts included, after the retries
            raise JudgeError(f"cannot reach the judge server at {self.base_url} ({e.__class__.__name__}: "
                             f"{e}; tried {self.retries + 1} times): is it running? OPENAI_BASE_URL "
                             f"says where it is") from None
        except o.RateLimitError as e:
            raise JudgeError(f"{self.base_url} is still rate-limiting after {self.retries} retries (HTTP 429: "
                             f"{_server_message(e)}); lower --concurrency, raise --retries, or try later") from None
        except o.APIStatusError as e:
            raise JudgeError(f"{self.base_url} failed (HTTP {e.status_code}: {_server_message(e)}) "
                             f"after {self.retries} retries") from None
        choice = r.choices[0] if r.choices else None
        text = (choice.message.content if choice is not None else None) or ""
        usage = ({"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}
                 if r.usage is not None else None)
        return Reply(text, {"usage": usage, "served_by": r.model,
                            "finish_reason": choice.finish_reason if choice is not None else None})

    def __call__(self, questions):
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            replies = list(pool.map(self.ask, questions))
        except BaseException:  # an error or Ctrl-C: the questions not yet sent are not sent
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return replies


def _server_message(error):
    """What the server said, from its JSON error body when it sent one."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(getattr(error, "message", error))


def load_judge(spec, *, tokenizer=None, device="auto", dtype="auto", max_new_tokens=256, batch_size=8,
               concurrency=8, retries=5, timeout=600.0):
    """--judge: "openai:MODEL" (APIJudge), or a checkpoint directory (ModelJudge)."""
    if spec.startswith(OPENAI):
        return APIJudge(spec[len(OPENAI):], max_new_tokens, concurrency, retries, timeout)
    return load_model_judge(spec, tokenizer, device, dtype, max_new_tokens, batch_size)


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


