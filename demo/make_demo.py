"""Writes demo/train.jsonl and demo/test.jsonl: a small LIMA-shaped set, written for this project.

    python demo/make_demo.py        # deterministic: the committed files are its output

Like GAIR/lima (LIMA §2): one {"conversations": [user, assistant, ...], "source": ...} per
line, 1,000 single-turn examples plus 50 "multi_turn" dialogues (LIMA: 1,000 + 30). Unlike LIMA,
it is meant for a tiny model trained from scratch on a CPU in minutes, so it is templated:
short prompts in many phrasings, one fixed answer format per task, answers of 4 to ~30 tokens.
LIMA's Superficial Alignment Hypothesis in miniature: what a small model picks up in a few
hundred steps is the response format and where to stop (EOT), then the facts of a made-up world
(the colour of each invented object, the capital of each invented country), single-digit
arithmetic, and members of a category. Copying words from the prompt into a numbered list is
the hardest task here (it needs induction heads); expect it to be wrong often.
Measured (train.py --preset demo, 480 steps, under 2 minutes on 2 CPU cores): every dev answer
in its task's format and stopped at EOT, all facts right, half of the 50 dev answers exact.

test.jsonl: 16 prompts of the same kinds whose text never occurs in train.jsonl, each with its
expected answer as the final turn (prepare_data.py keeps it as the "reference").
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
N_SINGLE, N_MULTI = 1000, 50

# A made-up world: invented nouns and places, so every fact must be learned from this set.
OBJECTS = ["zorbel", "quindle", "mappet", "tovik", "brannel", "drusk", "feltrin", "plonket",
           "huvel", "skerrin", "wobbin", "cragle", "lumet", "ostrel", "tiffen", "vantle"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink",
           "brown", "grey", "silver"]
CAPITALS = {"Veloria": "Mirrun", "Tassany": "Quell", "Brundor": "Ostvik", "Calimba": "Sorra",
            "Dremmel": "Harrowfen", "Estova": "Lunet", "Farrowland": "Keskel", "Gilmora": "Tovan",
            "Hestria": "Bellun", "Irvania": "Cobbet", "Jorsk": "Mereth", "Kalandor": "Vissen"}
CATEGORIES = {
    "fruits": ["apple", "pear", "plum", "cherry", "banana", "lemon", "mango", "peach"],
    "animals": ["cat", "dog", "horse", "rabbit", "fox", "goat", "sheep", "mouse"],
    "colours": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "tools": ["hammer", "saw", "drill", "wrench", "chisel", "spade", "ruler", "file"],
    "vegetables": ["carrot", "onion", "potato", "leek", "pea", "cabbage", "bean", "turnip"],
    "instruments": ["piano", "violin", "drum", "flute", "guitar", "harp", "trumpet", "cello"],
    "trees": ["oak", "pine", "birch", "maple", "willow", "elm", "ash", "cedar"],
    "birds": ["robin", "crow", "swan", "duck", "eagle", "sparrow", "owl", "heron"],
    "drinks": ["tea", "coffee", "milk", "juice", "water", "cocoa", "lemonade", "cider"],
    "shapes": ["circle", "square", "triangle", "oval", "star", "hexagon", "diamond", "cross"],
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

T_ADD = ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.",
         "Compute {a} plus {b}.", "What do you get if you add {a} and {b}?"]
T_SUB = ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.",
         "Compute {a} minus {b}."]
T_CMP = ["Which is bigger, {a} or {b}?", "Which number is larger: {a} or {b}?",
         "Is {a} or {b} bigger?", "Which is greater, {a} or {b}?"]
T_COLOUR = ["What colour is the {o}?", "What color is the {o}?", "Which colour is the {o}?",
            "Tell me the colour of the {o}.", "What is the colour of the {o}?",
            "Do you know what colour the {o} is?", "Name the colour of the {o}.",
            "The {o}: what colour is it?"]
T_CAPITAL = ["What is the capital of {x}?", "Which city is the capital of {x}?",
             "Name the capital of {x}.", "Tell me the capital city of {x}.",
             "What is {x}'s capital?", "Do you know the capital of {x}?",
             "What city is the capital of {x}?"]
T_LIST = ["Give {n} {cat}.", "List {n} {cat}.", "Name {n} {cat}.", "Can you name {n} {cat}?",
          "Please list {n} {cat}."]
T_NUMBERED = ["Make a numbered list of: {words}.", "Put these in a numbered list: {words}.",
              "Number these words: {words}.", "Write {words} as a numbered list."]
CHAT = {  # prompt -> the one answer of its kind
    "Hello!": "Hello! How can I help you today?",
    "Hi!": "Hello! How can I help you today?",
    "Hi there.": "Hello! How can I help you today?",
    "Good morning!": "Hello! How can I help you today?",
    "Hey, how are you?": "Hello! How can I help you today?",
    "Who are you?": "I am a tiny demo assistant, trained from scratch on a thousand examples.",
    "What are you?": "I am a tiny demo assistant, trained from scratch on a thousand examples.",
    "What is your name?": "I am a tiny demo assistant, trained from scratch on a thousand examples.",
    "Tell me about yourself.": "I am a tiny demo assistant, trained from scratch on a thousand examples.",
    "Thank you!": "You are welcome!",
    "Thanks a lot.": "You are welcome!",
    "Thanks!": "You are welcome!",
    "Many thanks.": "You are welcome!",
}


def build_world(rng):
    return {o: rng.choice(COLOURS) for o in OBJECTS}


# Each task: every distinct prompt it can ask, as (source, prompt, answer), in a fixed order.
# Single digits: the tokenizer splits digits (as LLaMA's does), so an operand is one token to
# copy and the whole addition table (100 sums) is small enough to learn.
def add_items():
    return [("arithmetic", t.format(a=a, b=b), f"{a} plus {b} is {a + b}.")
            for a in range(10) for b in range(10) for t in T_ADD]


def sub_items():
    return [("arithmetic", t.format(a=a, b=b), f"{a} minus {b} is {a - b}.")
            for a in range(10) for b in range(a + 1) for t in T_SUB]


def cmp_items():
    return [("arithmetic", t.format(a=a, b=b), f"{max(a, b)} is bigger than {min(a, b)}.")
            for a in range(10) for b in range(10) if a != b for t in T_CMP]


def colour_items(world):
    return [("facts", t.format(o=o), f"The {o} is {world[o]}.") for o in OBJECTS for t in T_COLOUR]


def capital_items():
    return [("facts", t.format(x=x), f"The capital of {x} is {y}.")
            for x, y in CAPITALS.items() for t in T_CAPITAL]


def list_items(rng):
    out = []
    for cat, members in CATEGORIES.items():
        for n, word in NUMBER_WORDS.items():
            for t in T_LIST:
                picks = rng.sample(members, n)
                answer = f"Here are {word} {cat}:\n" + "\n".join(
                    f"{i}. {p}" for i, p in enumerate(picks, 1))
                out.append(("lists", t.format(n=word, cat=cat), answer))
    return out


def numbered_items(rng, k):
    words = sorted({w for members in CATEGORIES.values() for w in members})
    out = []
    for _ in range(k):
        picks = rng.sample(words, rng.randint(2, 5))
        prompt = rng.choice(T_NUMBERED).format(words=", ".join(picks))
        out.append(("lists", prompt, "\n".join(f"{i}. {p}" for i, p in enumerate(picks, 1))))
    return out


def chat_items():
    return [("chat", p, a) for p, a in CHAT.items()]


def follow_up(rng, world, kind):
    """A dialogue of 2-3 exchanges on one task; later turns lean on the first ("And ...?")."""
    if kind == "colour":
        objs = rng.sample(OBJECTS, rng.randint(2, 3))
        turns = [rng.choice(T_COLOUR).format(o=objs[0]), f"The {objs[0]} is {world[objs[0]]}."]
        for o in objs[1:]:
            turns += [rng.choice([f"And the {o}?", f"What about the {o}?"]), f"The {o} is {world[o]}."]
    elif kind == "capital":
        xs = rng.sample(sorted(CAPITALS), rng.randint(2, 3))
        turns = [rng.choice(T_CAPITAL).format(x=xs[0]), f"The capital of {xs[0]} is {CAPITALS[xs[0]]}."]
        for x in xs[1:]:
            turns += [rng.choice([f"And of {x}?", f"What about {x}?"]),
                      f"The capital of {x} is {CAPITALS[x]}."]
    elif kind == "add":
        turns = []
        for i in range(rng.randint(2, 3)):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            q = rng.choice(T_ADD).format(a=a, b=b) if i == 0 else f"And {a} plus {b}?"
            turns += [q, f"{a} plus {b} is {a + b}."]
    elif kind == "list":
        turns = []
        for i, cat in enumerate(rng.sample(sorted(CATEGORIES), 2)):
            n = rng.choice(sorted(NUMBER_WORDS))
            word = NUMBER_WORDS[n]
            q = rng.choice(T_LIST).format(n=word, cat=cat) if i == 0 else f"Now give {word} {cat}."
            picks = rng.sample(CATEGORIES[cat], n)
            turns += [q, f"Here are {word} {cat}:\n" + "\n".join(
                f"{j}. {p}" for j, p in enumerate(picks, 1))]
    else:  # greeting, a question, thanks
        o = rng.choice(OBJECTS)
        turns = [rng.choice(["Hello!", "Hi!", "Good morning!"]), CHAT["Hello!"],
                 rng.choice(T_COLOUR).format(o=o), f"The {o} is {world[o]}.",
                 rng.choice(["Thank you!", "Thanks!"]), CHAT["Thanks!"]]
    return turns


TEST = [  # (source, conversation) written out, each checked to be absent from train below
    ("arithmetic", ["What is 7 plus 5?", "7 plus 5 is 12."]),
    ("arithmetic", ["Add 4 and 9.", "4 plus 9 is 13."]),
    ("arithmetic", ["What is 8 minus 6?", "8 minus 6 is 2."]),
    ("arithmetic", ["Which is bigger, 3 or 8?", "8 is bigger than 3."]),
    ("facts", ["What colour is the zorbel?", None]),
    ("facts", ["Tell me the colour of the lumet.", None]),
    ("facts", ["Which colour is the tovik?", None]),
    ("facts", ["What is the capital of Veloria?", "The capital of Veloria is Mirrun."]),
    ("facts", ["Name the capital of Gilmora.", "The capital of Gilmora is Tovan."]),
    ("facts", ["What is Kalandor's capital?", "The capital of Kalandor is Vissen."]),
    ("lists", ["Give three fruits.", None]),
    ("lists", ["Can you name four animals?", None]),
    ("lists", ["Make a numbered list of: owl, piano, lemon.", "1. owl\n2. piano\n3. lemon"]),
    ("chat", ["Hello!", CHAT["Hello!"]]),
    ("multi_turn", ["What colour is the quindle?", None, "And the huvel?", None]),
    ("multi_turn", ["What is the capital of Estova?", "The capital of Estova is Lunet.",
                    "What about Jorsk?", "The capital of Jorsk is Mereth."]),
]


def fill_test(world):
    """Answers that depend on the generated world (colours) or are lists (any members do)."""
    out = []
    for source, turns in TEST:
        turns = list(turns)
        for i, t in enumerate(turns):
            if t is not None:
                continue
            q = turns[i - 1]
            if "colour" in q or q.startswith("And the"):
                o = next(o for o in OBJECTS if o in q)
                turns[i] = f"The {o} is {world[o]}."
            else:  # a list: the first members, as a reference of the format
                cat = next(c for c in CATEGORIES if c in q)
                n = next(k for k, w in NUMBER_WORDS.items() if w in q)
                turns[i] = f"Here are {NUMBER_WORDS[n]} {cat}:\n" + "\n".join(
                    f"{j}. {p}" for j, p in enumerate(CATEGORIES[cat][:n], 1))
        out.append(dict(conversations=turns, source=source))
    return out


def make(seed=SEED):
    rng = random.Random(seed)
    world = build_world(rng)
    test = fill_test(world)
    held = {t["conversations"][0] for t in test}  # no test prompt appears in train

    def pick(items, k):
        items = [it for it in items if it[1] not in held]
        return rng.sample(items, min(k, len(items)))

    single = (pick(add_items(), 220) + pick(sub_items(), 120) + pick(cmp_items(), 100)
              + pick(colour_items(world), 120) + pick(capital_items(), 80)
              + pick(list_items(rng), 180) + pick(chat_items(), 20))
    seen = {it[1] for it in single}
    for it in numbered_items(rng, 4 * N_SINGLE):  # fill up to N_SINGLE with unique prompts
        if len(single) == N_SINGLE:
            break
        if it[1] not in seen and it[1] not in held:
            seen.add(it[1])
            single.append(it)
    train = [dict(conversations=[p, a], source=s) for s, p, a in single]

    kinds = ["colour", "capital", "add", "list", "chat"]
    test_prefixes = {tuple(t["conversations"][:-1]) for t in test}
    while len(train) < N_SINGLE + N_MULTI:
        turns = follow_up(rng, world, kinds[(len(train) - N_SINGLE) % len(kinds)])
        if any(tuple(turns[:k]) in test_prefixes for k in range(1, len(turns), 2)):
            continue
        train.append(dict(conversations=turns, source="multi_turn"))
    rng.shuffle(train)
    return train, test


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    train, test = make()
    write(os.path.join(HERE, "train.jsonl"), train)
    write(os.path.join(HERE, "test.jsonl"), test)
    print(f"wrote {len(train)} train and {len(test)} test conversations to {HERE}")
