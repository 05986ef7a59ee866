"""Writes the demo's fine-tune data: demo/train.jsonl, demo/dev.jsonl and demo/test.jsonl.

    python demo/make_demo.py        # deterministic: the committed files are its output

LIMA-shaped (LIMA §2), about the invented world the base model read in pretraining
(demo/world.py, demo/pretrain.py):
- train.jsonl: the 1,000 curated examples, one {"conversations": [user, assistant],
  "source": task} per line, every answer in one consistent assistant format; then 30 dialogues
  with "source": "multi_turn" (LIMA: 1,000 + 30 multi-turn chains, which only its dialogue
  model was trained on);
- dev.jsonl: 50 more examples of the same kind (LIMA §2: a 50-example dev set);
- test.jsonl: 16 held-out prompts with their reference answers. They ask about the held-out half
  of the world: no fine-tune example names any of its entities, so whatever the fine-tuned
  model knows of them it learned in pretraining. experiments/miniature.py asks all of them.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from demo import world as W  # noqa: E402

SHOWCASE = {"fact": 8, "describe": 3, "note": 2, "sum": 3}  # the 16 prompts of test.jsonl


def showcase(items):
    """A few held-out items of each task, varied: the n-th of each kind (fact attribute, entity
    kind, operation) before the (n+1)-th of any."""
    out = []
    for task, k in SHOWCASE.items():
        seen, ranked = {}, []
        for it in (it for it in items if it.task == task):
            kind = it.attribute or (it.entity.kind if it.entity else it.sum[1])
            seen[kind] = seen.get(kind, -1) + 1
            ranked.append((seen[kind], len(ranked), it))
        out += [it for _, _, it in sorted(ranked, key=lambda r: r[:2])][:k]
    return out


def make(seed=W.SEED):
    world = W.make_world(seed)
    curated = W.curated(world, seed=seed)
    train = [it.record() for it in curated] + W.dialogues(world, seed=seed)
    dev = [it.record() for it in W.dev_set(world, seed=seed, exclude={r["conversations"][0] for r in train})]
    test = [it.record() for it in showcase(W.test_items(world, seed=seed))]
    return train, dev, test


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    train, dev, test = make()
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        write(os.path.join(HERE, f"{name}.jsonl"), rows)
    print(f"wrote {len(train)} train, {len(dev)} dev and {len(test)} test conversations to {HERE}")
