"""The paper's results as tables and a chart (its Figure 1 for preferences, and the §5
helpfulness means): text for the terminal, a PNG where matplotlib is installed (optional).
And a training run's curves as a PNG (`training_curves`), which train.py redraws every epoch."""

import io
import os

import numpy as np

import data
import files

def _basename(path):
    return os.path.basename(os.path.normpath(path)) if path else path


def pct(x):
    return f"{100 * x:5.1f}%"


def _rate_ci(block, name):
    lo, hi = block["ci"][name]
    return f"{pct(block['rate'][name])} [{100 * lo:4.1f}, {100 * hi:4.1f}]"


def count_str(x):
    return f"{x:g}" if x == int(x) else f"{x:.1f}"


def judges_of(records):
    return ", ".join(sorted({_basename(str(r.get("judge"))) for r in records}))


def pairwise_title(records, path):
    return f"{records[0].get('a')} (a) vs {records[0].get('b')} (b), judged by {judges_of(records)}  [{path}]"


def helpfulness_title(records, path):
    return f"{records[0].get('gen')}, judged by {judges_of(records)}  [{path}]"


def format_pairwise(summary, title):
    s = summary
    lines = [f"== {title}",
             f"{s['prompts']} prompts, {s['judgements']} judgements: {s['unparseable']} unparseable "
             f"(label null, kept in the file, not in the rates), {s['skipped']} skipped"]
    if s["trimmed"]:
        lines.append(f"{s['trimmed']} questions had answers trimmed (start kept) to fit the judge's context")
    if s["all"] is None:
        return "\n".join(lines + ["no parsed judgements: nothing to rate"])
    rows = [("all", s["all"])] + [(f"source {k}", b) for k, b in s["by_source"].items()]
    w = max(len(name) for name, _ in rows)
    cols = ("a", "tie", "b", "a_equal_or_preferred")
    lines.append(f"{'':{w}}  prompts  " + "  ".join(f"{h:<22}" for h in
                 ("a wins", "tie", "b wins", "a equal or preferred")).rstrip())
    for name, b in rows:
        cells = "  ".join(f"{_rate_ci(b, c):<22}" for c in cols)
        lines.append(f"{name:{w}}  {b['prompts']:7d}  {cells}".rstrip())
    c = s["all"]["counts"]
    split = (" (a prompt judged in both orders counts half for each)"
             if s["judgements"] > s["prompts"] else "")
    lines.append(f"counts{split}: a {count_str(c['a'])}, tie {count_str(c['tie'])}, b {count_str(c['b'])}; "
                 f"95% CIs: bootstrap over prompts")
    if s["shown_first"]:
        share, n = s["shown_first"]
        lines.append(f"position: Answer A chosen in {pct(share).strip()} of {n} decisive judgements "
                     f"(no position bias: ~50%)")
    if s["order_consistency"]:
        score, n = s["order_consistency"]
        lines.append(f"both orders agree (LIMA agreement score) on {pct(score).strip()} of {n} prompts")
    return "\n".join(lines)


def format_helpfulness(summary, title):
    s = summary
    lines = [f"== helpfulness 1-6 (LIMA §5): {title}",
             f"{s['prompts']} prompts, {s['responses']} responses: {s['unparseable']} unparseable "
             f"(score null, kept in the file, not in the mean)"]
    if s["trimmed"]:
        lines.append(f"{s['trimmed']} responses were trimmed (start kept) to fit the judge's context")
    if s["all"] is None:
        return "\n".join(lines + ["no parsed grades: nothing to average"])
    rows = [("all", s["all"])] + [(f"source {k}", b) for k, b in s["by_source"].items()]
    w = max(len(name) for name, _ in rows)
    lines.append(f"{'':{w}}  prompts  mean  95% CI (bootstrap over prompts)")
    for name, b in rows:
        lines.append(f"{name:{w}}  {b['prompts']:7d}  {b['mean']:.2f}  [{b['ci'][0]:.2f}, {b['ci'][1]:.2f}]")
    total = max(sum(s["histogram"].values()), 1)
    lines.append("grades: " + "  ".join(f"{k}: {pct(v / total).strip()}" for k, v in s["histogram"].items()))
    return "\n".join(lines)


def text_chart(pairwise_rows, helpful_rows, width=40):
    """The paper's Figure 1 as text: one stacked bar per comparison (a wins / tie / b wins),
    and one bar per helpfulness file (mean out of 6)."""
    lines = []
    names = [n for n, _ in pairwise_rows] + [n for n, _ in helpful_rows]
    w = min(max((len(n) for n in names), default=0), 48)
    if pairwise_rows:
        lines.append(f"{'':{w}}  '#' a wins, '=' tie, '.' b wins")
        for name, s in pairwise_rows:
            r = s["all"]["rate"]
            na, nt = round(width * r["a"]), round(width * (r["a"] + r["tie"])) - round(width * r["a"])
            bar = "#" * na + "=" * nt + "." * (width - na - nt)
            lines.append(f"{name[:w]:{w}}  |{bar}|  a {pct(r['a']).strip()}, tie {pct(r['tie']).strip()}, "
                         f"b {pct(r['b']).strip()}")
    if helpful_rows:
        lines.append(f"{'':{w}}  helpfulness, mean of 1-6")
        for name, s in helpful_rows:
            m, (lo, hi) = s["all"]["mean"], s["all"]["ci"]
            n = round(width * m / 6)
            lines.append(f"{name[:w]:{w}}  |{'#' * n}{' ' * (width - n)}|  {m:.2f} [{lo:.2f}, {hi:.2f}]")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files only, or None when matplotlib is not installed: it is
    optional, and every chart here is also given as text or can be drawn from the JSON lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def png_chart(path, pairwise_rows, helpful_rows):
    """The same chart as a PNG; False when matplotlib is not installed (it is optional)."""
    plt = pyplot()
    if plt is None:
        return False
    panels = [p for p in (pairwise_rows, helpful_rows) if p]
    heights = [1 + 0.45 * len(p) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    axes = list(axes[:, 0])
    if pairwise_rows:
        ax = axes.pop(0)
        for i, (name, s) in enumerate(pairwise_rows):
            left = 0.0
            for part, color, label in (("a", "#4c72b0", "a wins"), ("tie", "#bbbbbb", "tie"),
                                       ("b", "#dd8452", "b wins")):
                width = s["all"]["rate"][part]
                ax.barh(i, width, left=left, color=color, label=label if i == 0 else None)
                if width >= 0.05:
                    ax.text(left + width / 2, i, f"{100 * width:.0f}%", ha="center", va="center", fontsize=8)
                left += width
        ax.set_yticks(range(len(pairwise_rows)), [n for n, _ in pairwise_rows], fontsize=8)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=8)
    if helpful_rows:
        ax = axes.pop(0)
        means = np.array([s["all"]["mean"] for _, s in helpful_rows])
        ci = np.array([s["all"]["ci"] for _, s in helpful_rows]).T
        ax.barh(range(len(means)), means, xerr=np.abs(ci - means), color="#4c72b0", capsize=3)
        ax.set_yticks(range(len(means)), [n for n, _ in helpful_rows], fontsize=8)
        ax.set_xlim(0, 6)
        ax.set_xlabel("helpfulness (1-6), mean with 95% CI")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


# ---- a training run ---------------------------------------------------------------------------

TRAINING_CURVES = "training_curves.png"


def training_curves(out_dir):
    """training_curves.png in a train.py out_dir, from its metrics.jsonl (loss and learning rate
    per step) and dev.jsonl (dev loss per epoch): the training loss per step with its mean over
    each epoch, the dev loss at each epoch's end (LIMA §3: it may rise while the answers get
    better, so it is read, not obeyed), and the learning rate. -> the path, or None when
    matplotlib is not installed or there is nothing to draw yet."""
    def rows(name):
        path = os.path.join(out_dir, name)
        return [r for _, r in data.read_jsonl(path, repair_tail=True)] if os.path.exists(path) else []

    steps = rows("metrics.jsonl")
    dev = {r["epoch"]: r for r in rows("dev.jsonl")}  # a resumed run may repeat an epoch: the last
    plt = pyplot() if steps else None
    if plt is None:
        return None
    step = np.array([r["step"] for r in steps])
    epoch = np.array([r["epoch"] for r in steps])
    loss = np.array([r["loss"] for r in steps])
    ends = [step[epoch == e].max() for e in np.unique(epoch)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot(step, loss, color="#4c72b0", alpha=0.35, linewidth=1, label="train loss (step)")
    top.plot(ends, [loss[epoch == e].mean() for e in np.unique(epoch)], "o-", color="#4c72b0",
             label="train loss (epoch mean)")
    if dev:
        top.plot([r["step"] - 1 for r in dev.values()], [r["dev_loss"] for r in dev.values()], "s-",
                 color="#dd8452", label="dev loss (epoch end)")
        best = min(dev.values(), key=lambda r: r["dev_loss"])
        top.annotate(f"lowest {best['dev_loss']:.3f}", (best["step"] - 1, best["dev_loss"]),
                     textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8, color="#dd8452")
    for x in ends:
        for ax in (top, bottom):
            ax.axvline(x + 0.5, color="#dddddd", linewidth=0.8, zorder=0)
    top.set_ylabel("loss (nats per supervised token)")
    top.set_title(f"{os.path.basename(os.path.abspath(out_dir))}: epoch {epoch.max()}, step {step.max() + 1}",
                  fontsize=10)
    top.legend(frameon=False, fontsize=8)
    bottom.plot(step, [r["lr"] for r in steps], color="#55a868", label="learning rate")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step (grey lines: epoch ends)")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    path = os.path.join(out_dir, TRAINING_CURVES)
    files.write_atomic(path, png.getvalue())
    return path
