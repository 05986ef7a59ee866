"""The statistics of the paper's evaluations (LIMA §4-§5): preference rates with bootstrap
confidence intervals over prompts, the agreement score between two judges, helpfulness means.
Inputs are judgement / grade records as evaluate.py writes them."""

from collections import defaultdict

import numpy as np

from data import prompt_key
from judging import GRADES, LABELS, undo_order


def bootstrap_ci(values, n_boot=2000, seed=0, level=0.95, weights=None):
    """Percentile bootstrap over rows (prompts): values (n,) or (n, k) -> (lo, hi) of the mean of
    each column. Resampling whole prompts keeps whatever is nested in a prompt (both A/B orders,
    several samples) together, so their correlation is in the interval. weights (n,): the
    weighted mean instead (a dialogue's rate weighs by its number of responses, so the mean is
    the rate over all responses)."""
    if n_boot < 1 or len(values) == 0:
        raise ValueError(f"a bootstrap needs at least one resample and one value (got {n_boot} "
                         f"resamples of {len(values)} values)")
    v = np.asarray(values, dtype=np.float64)
    w = np.ones(len(v)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w.reshape((-1,) + (1,) * (v.ndim - 1))
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_boot, 256):  # chunks: (256, n, k) at a time
        idx = rng.integers(0, len(v), size=(min(256, n_boot - start), len(v)))
        means.append((v[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1))
    means = np.concatenate(means)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail], axis=0)
    return lo, hi


def _by_prompt(records):
    by_id = all(r.get("id") is not None for r in records)
    groups = defaultdict(list)
    for r in records:
        groups[prompt_key(r.get("id"), r.get("prompt", ""), by_id)].append(r)
    return groups


def _outcome_block(rows, n_boot, seed):
    """rows: (n, 3) per-prompt fractions of a / tie / b -> counts, rates and 95% CIs."""
    v = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    v = np.concatenate([v, v[:, :1] + v[:, 1:2]], axis=1)  # + "a equal or preferred"
    names = ("a", "tie", "b", "a_equal_or_preferred")
    mean = v.mean(0)
    lo, hi = bootstrap_ci(v, n_boot, seed)
    return {"prompts": len(v), "counts": dict(zip(names[:3], v[:, :3].sum(0).tolist())),
            "rate": dict(zip(names, mean.tolist())),
            "ci": {k: (float(l), float(h)) for k, l, h in zip(names, lo, hi)}}


def agreement_score(x, y):
    """LIMA §4: 1 for the same label, 0.5 when exactly one of the two said tie, else 0."""
    if x == y:
        return 1.0
    return 0.5 if (x == "tie") != (y == "tie") else 0.0


def pairwise_summary(records, n_boot=2000, seed=0):
    """Per prompt, the fractions of a / tie / b over its parsed judgements (both A/B orders
    average, cancelling position bias); rates are means over prompts, CIs by bootstrap."""
    groups = _by_prompt(records)
    rows, sources, consistency = [], [], []
    for rs in groups.values():
        labels = [r["label"] for r in rs if r.get("label") in LABELS]
        if labels:
            rows.append([labels.count(x) / len(labels) for x in LABELS])
            sources.append(rs[0].get("source"))
        orders = {r.get("order"): r["label"] for r in rs if r.get("label") in LABELS}
        if set(orders) == {"AB", "BA"}:
            consistency.append(agreement_score(orders["AB"], orders["BA"]))
    decisive = [r for r in records if r.get("label") in ("a", "b")]
    first = [undo_order("A", r.get("order")) == r["label"] for r in decisive]  # picked Answer A
    summary = {
        "judgements": len(records),
        "unparseable": sum(r.get("label") is None for r in records),
        "skipped": sum(r.get("label") == "skip" for r in records),
        "trimmed": sum(bool(r.get("trimmed")) for r in records),
        "prompts": len(groups), "judged_prompts": len(rows),
        "shown_first": (float(np.mean(first)), len(first)) if first else None,
        "order_consistency": (float(np.mean(consistency)), len(consistency)) if consistency else None,
        "all": _outcome_block(rows, n_boot, seed) if rows else None,
        "by_source": {},
    }
    if len({s for s in sources}) > 1:
        for src in sorted({s for s in sources}, key=str):
            sub = [row for row, s in zip(rows, sources) if s == src]
            summary["by_source"][src] = _outcome_block(sub, n_boot, seed)
    return summary


def agreement(records_1, records_2, n_boot=2000, seed=0):
    """Agreement of two judges over the prompts both judged (parsed labels only). A prompt
    judged several times (both orders) scores the mean over all cross pairs of its labels;
    with one judgement each this is exactly the paper's score."""
    files_1 = (records_1[0].get("a"), records_1[0].get("b")) if records_1 else None
    files_2 = (records_2[0].get("a"), records_2[0].get("b")) if records_2 else None
    flip = bool(files_1 and files_2) and files_1 != files_2 and files_1 == files_2[::-1]  # a, b swapped
    swap = {"a": "b", "b": "a"}
    by_id = all(r.get("id") is not None for r in records_1 + records_2)

    def labels(records, flip):
        out = defaultdict(list)
        for r in records:
            if r.get("label") in LABELS:
                lab = swap.get(r["label"], r["label"]) if flip else r["label"]
                out[prompt_key(r.get("id"), r.get("prompt", ""), by_id)].append(lab)
        return out

    l1, l2 = labels(records_1, False), labels(records_2, flip)
    shared = [k for k in l1 if k in l2]
    scores, confusion = [], defaultdict(float)
    for k in shared:
        pairs = [(x, y) for x in l1[k] for y in l2[k]]
        scores.append(np.mean([agreement_score(x, y) for x, y in pairs]))
        for x, y in pairs:
            confusion[x, y] += 1 / len(pairs)
    result = {"shared": len(shared), "only_1": len(l1) - len(shared), "only_2": len(l2) - len(shared),
              "flipped": flip, "files": (files_1, files_2), "confusion": dict(confusion)}
    if scores:
        lo, hi = bootstrap_ci(scores, n_boot, seed)
        result.update(score=float(np.mean(scores)), ci=(float(lo), float(hi)))
    return result


def helpfulness_summary(records, n_boot=2000, seed=0):
    """Each prompt's mean grade over its parsed samples, then the mean over prompts with a
    bootstrap CI over prompts (the samples stay nested in their prompt)."""
    groups = _by_prompt(records)
    means, sources = [], []
    for rs in groups.values():
        scores = [r["score"] for r in rs if isinstance(r.get("score"), int)]
        if scores:
            means.append(float(np.mean(scores)))
            sources.append(rs[0].get("source"))
    parsed = [r["score"] for r in records if isinstance(r.get("score"), int)]

    def block(values):
        lo, hi = bootstrap_ci(values, n_boot, seed)
        return {"prompts": len(values), "mean": float(np.mean(values)), "ci": (float(lo), float(hi))}

    summary = {"responses": len(records), "unparseable": len(records) - len(parsed),
               "trimmed": sum(bool(r.get("trimmed")) for r in records),
               "prompts": len(groups), "histogram": {s: parsed.count(s) for s in range(1, 7)},
               "all": block(means) if means else None, "by_source": {}}
    if len(set(sources)) > 1:
        for src in sorted(set(sources), key=str):
            summary["by_source"][src] = block([m for m, s in zip(means, sources) if s == src])
    return summary


def dialogue_summary(records, n_boot=2000, seed=0):
    """LIMA §6: the share of responses graded fail / pass / excellent (over every graded response,
    as the paper counts: 15 failures in 42 turns), with 95% CIs by a bootstrap over whole
    dialogues, since the turns of one conversation are not independent."""
    by_dialogue = defaultdict(list)
    for r in records:
        by_dialogue[r.get("dialogue")].append(r)
    counts, sizes = [], []
    for rs in by_dialogue.values():
        grades = [r["grade"] for r in rs if r.get("grade") in GRADES]
        if grades:
            counts.append([grades.count(g) for g in GRADES])
            sizes.append(len(grades))
    summary = {"responses": len(records), "dialogues": len(by_dialogue), "graded_dialogues": len(counts),
               "unparseable": sum(r.get("grade") is None for r in records),
               "skipped": sum(r.get("grade") == "skip" for r in records),
               "trimmed": sum(bool(r.get("trimmed")) for r in records), "all": None}
    if counts:
        c, n = np.asarray(counts, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
        lo, hi = bootstrap_ci(c / n[:, None], n_boot, seed, weights=n)
        summary["all"] = {"graded": int(n.sum()), "counts": dict(zip(GRADES, c.sum(0).astype(int).tolist())),
                          "rate": dict(zip(GRADES, (c.sum(0) / n.sum()).tolist())),
                          "ci": {g: (float(l), float(h)) for g, l, h in zip(GRADES, lo, hi)}}
    return summary
