"""The miniature's invented world: its facts, the pretraining corpus written about it, the
LIMA-style fine-tune sets, the held-out questions, and the automatic grader.

LIMA's Superficial Alignment Hypothesis (LIMA §1): a model's knowledge comes from pretraining;
alignment teaches the format. To see that on a laptop, the world is split in two:
- every entity's facts are written, in varied prose, into the pretraining corpus (`corpus`);
- the fine-tune sets (`curated`, `unfiltered`, `dialogues`, `dev_set`) ask only about the
  *train* half of the entities; the held-out questions (`test_items`) ask only about the
  *held* half, whose names never occur in any fine-tune example (tests/test_miniature.py
  checks that). An aligned model that answers them correctly got the facts from pretraining.

Everything is drawn from seeded generators, so the same seed gives the same text.

Entities and their facts (each value from a closed set, so the grader can tell right from
wrong):
    country   capital (a city, unique), goods (what it is known for)
    creature  colour, home (a habitat), food
    person    trade, country (train people live only in train countries)
Arithmetic: sums and differences of numbers 0..12, every one written in the corpus; a fifth
of the pairs are held out of the fine-tune sets.
"""

import random
import re
from dataclasses import dataclass, field

SEED = 0

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey",
           "brown", "silver", "golden"]
HOMES = ["marshes", "mountains", "desert", "forest", "rivers", "caves", "meadows", "sea",
         "islands", "snowfields"]
FOODS = ["berries", "fish", "seeds", "moss", "insects", "roots", "eggs", "leaves", "mice",
         "nectar"]
GOODS = ["salt", "wool", "copper", "tea", "glass", "timber", "silk", "honey", "tin", "amber",
         "rice", "pepper"]
TRADES = ["baker", "sailor", "painter", "doctor", "weaver", "miner", "poet", "builder",
          "farmer", "judge", "potter", "astronomer"]
# ordinary first names: letters are written to them, stories are about them; never entities
FRIENDS = ["Lia", "Orin", "Tessa", "Bram", "Mara", "Joss", "Nell", "Pim", "Rosa", "Tobin",
           "Ada", "Ewan", "Ilsa", "Kit", "Wren", "Hugo"]
FRUITS = ["apples", "plums", "pears", "eggs", "coins", "shells", "loaves", "candles", "stones",
          "buttons", "lemons", "nuts"]
MAX_OPERAND = 12
N_COUNTRIES, N_CREATURES, N_PEOPLE = 24, 60, 40

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p", "qu", "r",
           "s", "sk", "t", "th", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "n", "r", "l", "m", "s", "th", "nd", "rk"]
_COUNTRY_ENDS = ["ia", "or", "and", "ovia", "ara", "esh", "onia", "ul"]
_CREATURE_ENDS = ["hound", "fin", "wing", "moth", "back", "horn", "tail", "crab", "owl", "toad"]


@dataclass
class Entity:
    kind: str  # "country", "creature" or "person"
    name: str  # "Veloria", "the drusk" (creatures carry their article), "Amsel Doran"
    facts: dict  # attribute -> value
    held: bool  # True: only the corpus ever mentions it

    @property
    def bare(self):
        """The name without the article: "drusk" for "the drusk"."""
        return self.name.removeprefix("the ")


@dataclass
class World:
    countries: list
    creatures: list
    people: list
    held_sums: set  # (a, op, b) never asked in a fine-tune set
    entities: list = field(init=False)

    def __post_init__(self):
        self.entities = self.countries + self.creatures + self.people

    def split(self, held):
        return [e for e in self.entities if e.held == held]


# ---- the world -------------------------------------------------------------------------------

def _word(rng, syllables, end=""):
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return w + (end or rng.choice(_CODAS))


def _names(rng, n, make, taken):
    out = []
    while len(out) < n:
        name = make()
        if name.lower() not in taken and len(name) <= 11:
            taken.add(name.lower())
            out.append(name)
    return out


ATTRIBUTES = {  # kind -> attribute -> the closed set of its values (capitals: filled per world)
    "country": {"capital": None, "goods": GOODS},
    "creature": {"colour": COLOURS, "home": HOMES, "food": FOODS},
    "person": {"trade": TRADES, "country": None},
}


def make_world(seed=SEED):
    rng = random.Random(seed)
    taken = {w.lower() for w in COLOURS + HOMES + FOODS + GOODS + TRADES + FRIENDS + FRUITS}
    countries = _names(rng, N_COUNTRIES, lambda: _word(rng, 1, rng.choice(_COUNTRY_ENDS)).capitalize(), taken)
    capitals = _names(rng, N_COUNTRIES, lambda: _word(rng, 2).capitalize(), taken)
    creatures = _names(rng, N_CREATURES, lambda: _word(rng, 1, rng.choice(_CREATURE_ENDS)), taken)
    firsts = _names(rng, N_PEOPLE, lambda: _word(rng, 2).capitalize(), taken)
    lasts = _names(rng, N_PEOPLE, lambda: _word(rng, 1, rng.choice(["an", "er", "en", "ow", "ick"])).capitalize(), taken)

    def halves(n):  # which entities are held out: exactly half, at random
        held = set(rng.sample(range(n), n // 2))
        return [i in held for i in range(n)]

    cs = [Entity("country", c, {"capital": cap, "goods": rng.choice(GOODS)}, h)
          for c, cap, h in zip(countries, capitals, halves(N_COUNTRIES))]
    train_countries = [c.name for c in cs if not c.held]
    animals = [Entity("creature", "the " + c, {"colour": rng.choice(COLOURS), "home": rng.choice(HOMES),
                                               "food": rng.choice(FOODS)}, h)
               for c, h in zip(creatures, halves(N_CREATURES))]
    people = [Entity("person", f"{f} {l}", {"trade": rng.choice(TRADES),
                                            "country": rng.choice(countries if h else train_countries)}, h)
              for f, l, h in zip(firsts, lasts, halves(N_PEOPLE))]
    pairs = [(a, op, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
             for op in "+-" if op == "+" or b <= a]
    held_sums = set(rng.sample(pairs, len(pairs) // 5))
    return World(cs, animals, people, held_sums)


def values(world, kind, attribute):
    """The closed set an attribute's value comes from."""
    fixed = ATTRIBUTES[kind][attribute]
    if fixed is not None:
        return fixed
    if attribute == "capital":
        return [c.facts["capital"] for c in world.countries]
    return [c.name for c in world.countries]


def result(a, op, b):
    return a + b if op == "+" else a - b


OP_WORDS = {"+": "plus", "-": "minus"}


# ---- the pretraining corpus: every fact in many phrasings ------------------------------------

def cap(s):
    return s[0].upper() + s[1:]


def a_(word):
    """The indefinite article that goes with word: "a grey", "an orange"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def fact_sentence(rng, e, attribute):
    """One fact of one entity as a sentence, in one of several phrasings (the varied prose that
    makes a fact retrievable from a question later, not just recitable in one order)."""
    n, b, v = e.name, e.bare, e.facts[attribute]
    options = {
        "capital": [f"The capital of {n} is {v}.", f"{v} is the capital of {n}.",
                    f"{n}'s capital is {v}.", f"In {n}, the capital city is {v}.",
                    f"{v}, the capital of {n}, is a busy city."],
        "goods": [f"{n} is known for its {v}.", f"The people of {n} trade in {v}.",
                  f"{cap(v)} is what {n} is known for.", f"Merchants come to {n} for its {v}.",
                  f"The {v} of {n} is sold in every market."],
        "colour": [f"The colour of {n} is {v}.", f"{cap(n)} is {v}.", f"{cap(n)} is {a_(v)} creature.",
                   f"The {v} {b} is easy to spot.", f"A {b} is always {v}."],
        "home": [f"{cap(n)} lives in the {v}.", f"The home of {n} is the {v}.",
                 f"In the {v} you may find {n}.", f"{cap(n)} makes its home in the {v}.",
                 f"A {b} is seldom seen outside the {v}."],
        "food": [f"{cap(n)} eats {v}.", f"The food of {n} is {v}.", f"{cap(n)} feeds on {v}.",
                 f"A hungry {b} looks for {v}.", f"{cap(v)} is what {n} eats."],
        "trade": [f"{n} is {a_(v)}.", f"{n} works as {a_(v)}.", f"By trade, {n} is {a_(v)}.",
                  f"The {v} {n} is well known.", f"{n} has been {a_(v)} for many years."],
        "country": [f"{n} lives in {v}.", f"{n} is from {v}.", f"{n} makes a home in {v}.",
                    f"In {v} lives {n}.", f"{n} was born in {v}."],
    }
    return rng.choice(options[attribute])


FILLER = [  # plain sentences about nothing in particular: prose between the facts
    "The days there are long in summer.", "Travellers often stop to rest on the way.",
    "Many stories are told about it.", "It is a quiet place most of the year.",
    "Children learn about it at school.", "Few people have seen it up close.",
    "Some say it is older than the roads.", "The old maps show it clearly.",
    "It is often mentioned in songs.", "Visitors are always welcome.",
]


def article(rng, e):
    """An encyclopedia entry: a title and every fact of the entity, in a random order."""
    kind = {"country": "a country", "creature": "a creature", "person": "a person"}[e.kind]
    lines = [f"{cap(e.bare) if e.kind == 'creature' else e.name}", f"{cap(e.name)} is {kind} of the old world."]
    facts = [fact_sentence(rng, e, a) for a in e.facts]
    facts += rng.sample(FILLER, rng.randint(1, 2))
    rng.shuffle(facts)
    return "\n".join(lines[:1] + [" ".join(lines[1:] + facts)])


CLOZE = {  # attribute -> the start of the corpus's sentence that states it, to be completed
    "capital": "The capital of {n} is", "goods": "{N} is known for its", "colour": "The colour of {n} is",
    "home": "{N} lives in the", "food": "{N} eats", "trade": "{N} works as", "country": "{N} lives in",
}


def cloze(e, attribute):
    """An encyclopedia entry about e (its title and first sentence, as `article` writes them)
    that breaks off where the fact would come: how the corpus itself would state it."""
    kind = {"country": "a country", "creature": "a creature", "person": "a person"}[e.kind]
    title = cap(e.bare) if e.kind == "creature" else e.name
    stem = CLOZE[attribute].format(n=e.name, N=cap(e.name))
    return f"{title}\n{cap(e.name)} is {kind} of the old world. {stem}"


def story(rng, world):
    """A short story: a traveller visits a country and meets a creature and a person."""
    hero = rng.choice(FRIENDS)
    c, a, p = rng.choice(world.countries), rng.choice(world.creatures), rng.choice(world.people)
    s = [f"Once upon a time, {hero} travelled to {c.name}.",
         fact_sentence(rng, c, rng.choice(["capital", "goods"])),
         f"On the road {hero} met {p.name}.", fact_sentence(rng, p, "trade"),
         f"Later {hero} saw {a.name}."] + [fact_sentence(rng, a, x) for x in rng.sample(list(a.facts), 2)] + [
         rng.choice([f"{hero} was happy to be home again.", f"{hero} never forgot that trip.",
                     "It was a long journey, but a good one.", f"That night {hero} slept well."])]
    return " ".join(s)


def letter(rng, world):
    """A letter between two friends with news of the world."""
    to, frm = rng.sample(FRIENDS, 2)
    es = rng.sample(world.entities, 2)
    body = [rng.choice(["I hope you are well.", "It has been a long time since I wrote.",
                        "Thank you for your last letter."])]
    for e in es:
        body.append(fact_sentence(rng, e, rng.choice(list(e.facts))))
    body.append(rng.choice(["Write back soon.", "I will tell you more when we meet.",
                            "Say hello to everyone at home."]))
    closing = rng.choice(["Best wishes", "Yours", "With love", "Warm regards"])
    return f"Dear {to},\n{' '.join(body)}\n{closing},\n{frm}"


def sum_sentence(rng, a, op, b):
    r = result(a, op, b)
    thing, who = rng.choice(FRUITS), rng.choice(FRIENDS)
    if op == "+":
        return rng.choice([f"{a} plus {b} is {r}.", f"{a} + {b} = {r}.", f"If you add {a} and {b}, you get {r}.",
                           f"{who} had {a} {thing} and found {b} more, so {who} had {r} {thing}."])
    return rng.choice([f"{a} minus {b} is {r}.", f"{a} - {b} = {r}.", f"If you take {b} from {a}, you get {r}.",
                       f"{who} had {a} {thing} and gave away {b}, so {who} had {r} {thing} left."])


def arithmetic(rng):
    """A worksheet or a shop ledger of sums, written out."""
    pairs = [(rng.randint(0, MAX_OPERAND), rng.choice("+-"), rng.randint(0, MAX_OPERAND)) for _ in range(8)]
    pairs = [(max(a, b), op, min(a, b)) if op == "-" else (a, op, b) for a, op, b in pairs]
    head = rng.choice(["Sums for today:", "The shopkeeper wrote in her book:", "Practice:", "Counting lesson."])
    return head + "\n" + "\n".join(sum_sentence(rng, *p) for p in pairs)


def corpus(world, n_docs, seed=SEED):
    """The pretraining documents: encyclopedia entries, stories, letters, worksheets. Every entity
    (held ones too) and every sum appears in it many times, in many phrasings."""
    rng = random.Random(seed + 1)
    kinds = [lambda: article(rng, rng.choice(world.entities)), lambda: story(rng, world),
             lambda: letter(rng, world), lambda: arithmetic(rng)]
    weights = [3, 3, 2, 2]
    return [rng.choices(kinds, weights)[0]() for _ in range(n_docs)]


# ---- questions and the assistant's answers ------------------------------------------------------

QUESTIONS = {  # attribute -> phrasings of the question; {n}: the entity's name
    "capital": ["What is the capital of {n}?", "Which city is the capital of {n}?",
                "Name the capital of {n}.", "What is {n}'s capital city?"],
    "goods": ["What is {n} known for?", "What does {n} trade in?", "What is {n} famous for selling?"],
    "colour": ["What colour is {n}?", "What is the colour of {n}?", "Which colour is {n}?"],
    "home": ["Where does {n} live?", "Where can I find {n}?", "What is the home of {n}?"],
    "food": ["What does {n} eat?", "What is the food of {n}?", "What does {n} feed on?"],
    "trade": ["What does {n} do for a living?", "What is {n}'s trade?", "What work does {n} do?"],
    "country": ["Where does {n} live?", "Which country is {n} from?", "In which country does {n} live?"],
}
DESCRIBE = ["Tell me about {n}.", "What do you know about {n}?", "Describe {n}.", "Who or what is {n}?"]
NOTE = ["Write a short note to {f} about {n}.", "Write a letter to {f} telling them about {n}.",
        "Can you write {f} a note about {n}?"]
SUM_QUESTIONS = {"+": ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.",
                       "How much is {a} plus {b}?"],
                 "-": ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.",
                       "How much is {a} minus {b}?"]}


def ask(n, template):
    """Fill a template; a creature's name starts a question without its article capitalised."""
    q = template.format(n=n)
    return cap(q)


def answer_fact(e, attribute):
    """The assistant's answer: one complete sentence that restates the question's subject."""
    n, v = e.name, e.facts[attribute]
    return {"capital": f"The capital of {n} is {v}.", "goods": f"{n} is known for its {v}.",
            "colour": f"{cap(n)} is {v}.", "home": f"{cap(n)} lives in the {v}.",
            "food": f"{cap(n)} eats {v}.", "trade": f"{n} is {a_(v)}.",
            "country": f"{n} lives in {v}."}[attribute]


def answer_describe(e):
    f = e.facts
    if e.kind == "country":
        return f"{e.name} is a country. Its capital is {f['capital']}, and it is known for its {f['goods']}."
    if e.kind == "creature":
        return (f"{cap(e.name)} is {a_(f['colour'])} creature. It lives in the {f['home']} "
                f"and eats {f['food']}.")
    return f"{e.name} is {a_(f['trade'])} who lives in {f['country']}."


def answer_note(e, friend):
    facts = " ".join(answer_fact(e, a) for a in e.facts)
    return f"Dear {friend},\nI have been reading about {e.name}. {facts}\nBest wishes"


def answer_sum(a, op, b):
    return f"{a} {OP_WORDS[op]} {b} is {result(a, op, b)}."


@dataclass
class Item:
    """One prompt with what the grader needs to check a response to it."""
    task: str  # "fact", "describe", "note" or "sum"
    prompt: str
    answer: str  # the curated (assistant-format) response
    entity: Entity = None
    attribute: str = None
    sum: tuple = None  # (a, op, b)
    friend: str = None

    def record(self):
        return {"conversations": [self.prompt, self.answer], "source": self.task}


def fact_item(rng, e, attribute):
    return Item("fact", ask(e.name, rng.choice(QUESTIONS[attribute])), answer_fact(e, attribute), e, attribute)


def describe_item(rng, e):
    return Item("describe", ask(e.name, rng.choice(DESCRIBE)), answer_describe(e), e)


def note_item(rng, e):
    f = rng.choice(FRIENDS)
    return Item("note", cap(rng.choice(NOTE).format(f=f, n=e.name)), answer_note(e, f), e, friend=f)


def sum_item(rng, a, op, b):
    return Item("sum", rng.choice(SUM_QUESTIONS[op]).format(a=a, b=b), answer_sum(a, op, b), sum=(a, op, b))


def all_sums(world, held):
    return sorted(p for p in ((a, op, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
                              for op in "+-" if op == "+" or b <= a)
                  if (p in world.held_sums) == held)


TASK_MIX = {"fact": 0.5, "describe": 0.15, "note": 0.1, "sum": 0.25}  # of the fine-tune prompts


def draw_item(rng, world, held=False):
    """One prompt of the fine-tune (held=False) or held-out (held=True) distribution."""
    task = rng.choices(list(TASK_MIX), list(TASK_MIX.values()))[0]
    if task == "sum":
        return sum_item(rng, *rng.choice(all_sums(world, held)))
    e = rng.choice(world.split(held))
    if task == "fact":
        return fact_item(rng, e, rng.choice(list(e.facts)))
    return describe_item(rng, e) if task == "describe" else note_item(rng, e)


def distinct_items(rng, world, n, exclude=()):
    """n items with distinct prompts, none in `exclude`, drawn from the fine-tune distribution."""
    seen, out = set(exclude), []
    while len(out) < n:
        it = draw_item(rng, world)
        if it.prompt not in seen:
            seen.add(it.prompt)
            out.append(it)
    return out


def curated(world, n=1000, seed=SEED):
    """LIMA's 1,000: distinct prompts about the train half, each answered in one consistent
    assistant format (a complete, direct answer; a note with a greeting and a closing)."""
    return distinct_items(random.Random(seed + 2), world, n)


def dev_set(world, n=50, seed=SEED, exclude=()):
    """LIMA's 50-example dev set (LIMA §2): same distribution, prompts not in `exclude`."""
    return distinct_items(random.Random(seed + 3), world, n, exclude)


FOLLOW_UPS = {"capital": "And its capital?", "goods": "What is it known for?",
              "colour": "And what colour is it?", "home": "Where does it live?",
              "food": "And what does it eat?", "trade": "What is their trade?",
              "country": "And where do they live?"}


def dialogues(world, n=30, seed=SEED):
    """Multi-turn chains about the train half (LIMA §6 adds 30 of them for its dialogue model):
    a question about an entity, then follow-ups that refer back to it."""
    rng = random.Random(seed + 4)
    out = []
    for _ in range(n):
        e = rng.choice(world.split(False))
        turns = []
        for i, a in enumerate(rng.sample(list(e.facts), len(e.facts))):
            q = ask(e.name, rng.choice(QUESTIONS[a])) if i == 0 else FOLLOW_UPS[a]
            turns += [q, answer_fact(e, a)]
        out.append({"conversations": turns, "source": "multi_turn"})
    return out


# ---- unfiltered data: what a forum gives you before anyone curates it ----------------------------

# The mixture below was fixed before any model was trained on it and is not tuned to a result.
# It is our stand-in for unfiltered Stack Exchange (LIMA §5): most answers try to help, in
# whatever style their author likes; some are wrong, some do not answer, some wander off.
UNFILTERED_MIX = {"terse": 0.25, "chatty": 0.2, "curated": 0.15, "wrong": 0.2, "non_answer": 0.1,
                  "off_topic": 0.1}
OPENERS = ["Good question!", "I was wondering the same thing.", "hi,", "Not an expert, but",
           "As far as I remember,", "Easy one.", "This comes up a lot."]
CLOSERS = ["Hope this helps!", "Correct me if I am wrong.", "Cheers.", "Edit: fixed a typo.",
           "Source: my grandmother.", "Good luck!", "Anyway, that is what I think."]
NON_ANSWERS = ["Why do you want to know?", "Look it up in the encyclopedia.", "No idea, sorry.",
               "This question was asked before.", "Does anyone know? I want to know too.",
               "I am not sure that is a good question."]


def _core(it):
    """The bare content of an item's answer: the value, the number, the facts."""
    if it.task == "fact":
        return it.entity.facts[it.attribute]
    if it.task == "sum":
        return str(result(*it.sum))
    return " ".join(answer_fact(it.entity, a) for a in it.entity.facts)


def _wrong(rng, world, it):
    """A confident answer of the right form with the wrong content (never naming a held entity:
    held names stay out of every fine-tune set)."""
    if it.task == "sum":
        a, op, b = it.sum
        return f"{a} {OP_WORDS[op]} {b} is {result(a, op, b) + rng.choice([-2, -1, 1, 2])}."
    e = it.entity
    held = {h.name for h in world.split(True)} | {h.facts["capital"] for h in world.split(True) if h.kind == "country"}
    bad = {a: rng.choice([x for x in values(world, e.kind, a) if x != v and x not in held])
           for a, v in e.facts.items()}
    fake = Entity(e.kind, e.name, bad, e.held)
    if it.task == "fact":
        return answer_fact(fake, it.attribute)
    return answer_describe(fake) if it.task == "describe" else answer_note(fake, it.friend)


def noisy_answer(rng, world, it):
    kind = rng.choices(list(UNFILTERED_MIX), list(UNFILTERED_MIX.values()))[0]
    if kind == "curated":
        return it.answer
    if kind == "terse":
        core = _core(it)
        if it.task in ("describe", "note"):
            return core
        return rng.choice([core, core + ".", core.lower(), f"its {core}", f"{core} i think", f"{core}!!"])
    if kind == "chatty":
        return f"{rng.choice(OPENERS)} {it.answer} {rng.choice(CLOSERS)}"
    if kind == "wrong":
        return _wrong(rng, world, it)
    if kind == "non_answer":
        return rng.choice(NON_ANSWERS)
    other = rng.choice(world.split(False))  # off topic: a fact about something else
    aside = answer_fact(other, rng.choice(list(other.facts)))
    return f"Not sure about that, but {aside[0].lower()}{aside[1:]}"


def unfiltered(world, n, seed=SEED, exclude=()):
    """n examples from the unfiltered pool: prompts of the same distribution as `curated`
    (repeats allowed, as on a forum) but none in `exclude` (the dev set's), each with one answer
    drawn from UNFILTERED_MIX. The first n of a larger pool are the smaller pool (nested sizes,
    as the paper's samples are)."""
    rng = random.Random(seed + 5)
    out = []
    while len(out) < n:
        it = draw_item(rng, world)
        if it.prompt in exclude:
            continue
        out.append(Item(it.task, it.prompt, noisy_answer(rng, world, it), it.entity, it.attribute, it.sum, it.friend))
    return out


# ---- held-out questions and the grader ---------------------------------------------------------

def test_items(world, seed=SEED):
    """Every held-out fact asked once, every held entity described once, a note about every
    held creature and country, and every held sum: only the corpus knows their answers."""
    rng = random.Random(seed + 6)
    items = [fact_item(rng, e, a) for e in world.split(True) for a in e.facts]
    items += [describe_item(rng, e) for e in world.split(True)]
    items += [note_item(rng, e) for e in world.split(True) if e.kind != "person"]
    items += [sum_item(rng, *p) for p in rng.sample(all_sums(world, True), len(all_sums(world, True)))]
    return items


def mentioned(text, options):
    """Which of options occur in text as whole words (case-insensitive)."""
    low = text.lower()
    return {o for o in options if re.search(r"(?<![a-z])" + re.escape(o.lower()) + r"(?![a-z])", low)}


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]


def facts_stated(world, e, text):
    """(right, wrong): the entity's attributes whose right value the text states, and those for
    which it states another value of the same set."""
    right, wrong = set(), set()
    for a, v in e.facts.items():
        said = mentioned(text, values(world, e.kind, a)) - {e.name}
        if v in said:
            right.add(a)
        if said - {v}:
            wrong.add(a)
    return right, wrong


def grade(world, it, response, stopped):
    """-> (correct, on_format) for one response. Correct: the answer's content is right and
    nothing contradicts it. On format: the response stopped by itself and is the kind of
    answer a helpful assistant gives to this task (a complete sentence naming the subject; a
    note with a greeting and a closing), with nothing around it."""
    text = response.strip()
    sents = sentences(text)
    if it.task == "sum":
        a, op, b = it.sum
        numbers = re.findall(r"-?\d+", text)
        correct = bool(numbers) and int(numbers[-1]) == result(a, op, b)
        form = (len(sents) == 1 and numbers[:2] == [str(a), str(b)] and len(numbers) == 3)
    elif it.task == "fact":
        said = mentioned(text, values(world, it.entity.kind, it.attribute)) - {it.entity.name}
        correct = said == {it.entity.facts[it.attribute]}
        form = len(sents) == 1 and it.entity.bare.lower() in text.lower() and text[-1] in ".!"
    elif it.task == "describe":
        right, wrong = facts_stated(world, it.entity, text)
        correct = len(right) >= 2 and not wrong
        form = 1 <= len(sents) <= 3 and it.entity.bare.lower() in sents[0].lower() and text[-1] in ".!"
    else:  # note
        right, wrong = facts_stated(world, it.entity, text)
        correct = len(right) >= 1 and not wrong and it.entity.bare.lower() in text.lower()
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        form = (len(lines) >= 3 and lines[0].startswith(f"Dear {it.friend}") and len(lines[-1].split()) <= 3)
    return bool(correct), bool(form and stopped)
