"""Plant bugs in the paper's recipe, one at a time, in a scratch copy of the repository, and check
that the tests meant to guard each one fail. A test earns its place by failing when what it guards
is wrong; this is how that is checked, and how the next change to the recipe can be.

    python tests/mutations.py                    # each mutation against its own tests (~15 minutes)
    python tests/mutations.py --full             # each mutation against the whole suite (hours)
    python tests/mutations.py --only adamw_betas_swapped clip_removed
    python tests/mutations.py --list_only        # the mutations, and whether their code is found

Each mutation names its code by a snippet of source text and the text that replaces it (a few
alternatives where the code is known to take more than one form), so the list keeps working when
code moves. A snippet found nowhere, or more than once, is reported as "pattern not found", never
as caught: update the list. The tests run as `python -m pytest -q -x` in the copy, first once with
no mutation (they must pass), then once per mutation. Exit status 0 when every mutation is caught.

Not part of the test suite (pytest collects tests/test_*.py only) and imported by no test.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import parse_config  # noqa: E402  (the repository's modules, from its root)

RECIPE = ("tests/test_recipe.py",)


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the bug, in words
    file: str
    edits: tuple  # ((snippet, replacement), ...): the first snippet found exactly once is replaced
    tests: tuple = RECIPE  # the test files (or node ids) that must fail


def one(old, new):
    return ((old, new),)


MUTATIONS = [
    # ---- the optimizer: AdamW (0.9, 0.95), weight decay 0.1 on the matrices (LIMA §3) ----
    Mutation("adamw_betas_swapped", "AdamW built with beta1 and beta2 swapped", "train.py",
             one("betas=(cfg.beta1, cfg.beta2)", "betas=(cfg.beta2, cfg.beta1)")),
    Mutation("adamw_decay_on_norms", "weight decay on the norms' gains too", "train.py",
             one("dict(params=no_decay, weight_decay=0.0)", "dict(params=no_decay, weight_decay=cfg.weight_decay)")),
    Mutation("adamw_no_decay", "no weight decay on the matrices", "train.py",
             one("dict(params=decay, weight_decay=cfg.weight_decay)", "dict(params=decay, weight_decay=0.0)")),
    Mutation("adamw_eps", "AdamW's eps 1e-6 instead of 1e-8", "train.py",
             one("eps=1e-8)", "eps=1e-6)")),
    Mutation("bf16_round_to_nearest", "bf16 master weights rounded to nearest, not stochastically",
             "optim.py", one("dst.copy_(stochastic_round_bf16(src, generator) if dst.dtype == torch.bfloat16 else src)",
                             "dst.copy_(src)"), RECIPE + ("tests/test_optim.py",)),
    Mutation("bf16_rounding_biased", "stochastic rounding with 15 random bits: rounds down more often",
             "optim.py", one("torch.randint(0, 1 << 16, x.shape", "torch.randint(0, 1 << 15, x.shape"),
             RECIPE + ("tests/test_optim.py",)),
    Mutation("bf16_adamw_no_bias_correction", "optim.AdamW without the first moment's bias correction",
             "optim.py", one("value=-lr / (1 - beta1 ** step))", "value=-lr)"), RECIPE + ("tests/test_optim.py",)),
    # ---- the schedule: 1e-5 at the first step, linearly to 1e-6 at the last, no warmup ----
    Mutation("lr_ends_above_min", "the decay reaches 1e-6 one step after the last", "train.py",
             one("* step / max(total_steps - 1, 1)", "* step / max(total_steps, 1)")),
    Mutation("lr_warmup", "a 3-step warmup before the decay", "train.py",
             one("return cfg.lr + (cfg.min_lr - cfg.lr) * step / max(total_steps - 1, 1)",
                 "return min(cfg.lr * (step + 1) / 3, cfg.lr + (cfg.min_lr - cfg.lr) * step / max(total_steps - 1, 1))")),
    Mutation("lr_not_applied", "the schedule logged but the optimizer kept at the initial lr", "train.py",
             one('for group in run.optimizer.param_groups:\n        group["lr"] = lr\n',
                 'for group in run.optimizer.param_groups:\n        group["lr"] = cfg.lr\n')),
    Mutation("lr_one_step_late", "step s is given the learning rate of step s + 1", "train.py",
             one("lr = lr_at(run.step, total_steps, cfg)", "lr = lr_at(run.step + 1, total_steps, cfg)")),
    # ---- gradient clipping at 1.0 ----
    Mutation("clip_removed", "gradient clipping removed (the norm still measured)", "train.py",
             one('grad_clip if grad_clip > 0 else float("inf")', 'float("inf")')),
    Mutation("clip_not_passed", "the loop steps without the configured clip", "train.py",
             one("micro, n_supervised, cfg.grad_clip)", "micro, n_supervised, 0.0)")),
    Mutation("clip_default_off", "--grad_clip defaults to 0 (off)", "train.py",
             one("grad_clip: float = field(default=1.0", "grad_clip: float = field(default=0.0")),
    # ---- residual dropout: 0 at the bottom layer, linearly to p_max at the top (LIMA §3) ----
    Mutation("dropout_schedule_shifted", "p_l = p_max (l + 1) / L: the bottom layer drops too", "model.py",
             one("self.resid_dropout = args.resid_dropout * layer_id / max(args.n_layers - 1, 1)",
                 "self.resid_dropout = args.resid_dropout * (layer_id + 1) / args.n_layers"),
             RECIPE + ("tests/test_model.py",)),
    Mutation("dropout_ffn_branch_missing", "no dropout on the feed-forward branch", "model.py",
             (("return x + F.dropout(h, self.resid_dropout, self.training)", "return x + h"),
              ("h = self.feed_forward(self.ffn_norm(x))\n        return x + self.dropout(h)",
               "h = self.feed_forward(self.ffn_norm(x))\n        return x + h"))),
    Mutation("dropout_on_the_stream", "dropout applied to the residual stream, not the branch", "model.py",
             (("x = x + F.dropout(h, self.resid_dropout, self.training)",
               "x = F.dropout(x + h, self.resid_dropout, self.training)"),
              ("x = x + self.dropout(h)", "x = self.dropout(x + h)"))),
    Mutation("dropout_in_eval", "residual dropout active in eval mode too", "model.py",
             (("x = x + F.dropout(h, self.resid_dropout, self.training)", "x = x + F.dropout(h, self.resid_dropout, True)"),
              ("if self.training and self.resid_dropout > 0 else h", "if self.resid_dropout > 0 else h"))),
    Mutation("dropout_pmax_not_passed", "train.py never gives the model --resid_dropout", "train.py",
             one("args.resid_dropout = cfg.resid_dropout", "args.resid_dropout = 0.0")),
    # ---- the EOT rows: the mean of the base's rows ----
    Mutation("eot_rows_zero", "the EOT rows appended as zeros, not the mean of the base rows", "train.py",
             one("tensor = mean_rows(tensor)", "tensor = torch.cat([tensor, torch.zeros_like(tensor[:1])])")),
    Mutation("eot_rows_first_row", "mean_rows copies the first row instead of the mean", "model.py",
             one("new = weight.float().mean(0, keepdim=True)", "new = weight.float()[:1]"),
             RECIPE + ("tests/test_model.py",)),
    Mutation("untrained_eot_left_zero", "a Llama 3 base's untrained (zero) EOT row left at zero", "train.py",
             one("tensor, untrained = init_untrained_row(tensor, eot_id)", "untrained = False")),
    Mutation("untrained_eot_mean_of_all", "the untrained row's mean divided by every row, zeros too", "model.py",
             one("/ trained.sum().clamp(min=1)", "/ weight.shape[0]"), RECIPE + ("tests/test_model.py",)),
    # ---- the loss: the assistant's tokens and their EOT, the mean over the whole step ----
    Mutation("mask_trains_user_turns", "the loss trains on the user's turns too", "tokenizer.py",
             one("trains = train_on_prompt or i % 2 == 1", "trains = True"),
             RECIPE + ("tests/test_tokenizer.py",)),
    Mutation("mask_skips_assistant_eot", "the EOT closing an assistant turn is not trained", "tokenizer.py",
             one("mask += [trains] * len(ids)", "mask += [trains] * (len(ids) - 1) + [False]"),
             RECIPE + ("tests/test_tokenizer.py",)),
    Mutation("pack_mask_shifted", "targets masked by the input's mask, one position off", "train.py",
             one("target[~torch.tensor(mask[1:], dtype=torch.bool)]", "target[~torch.tensor(mask[:-1], dtype=torch.bool)]")),
    Mutation("loss_mean_per_micro_batch", "each micro-batch's mean, not the whole step's", "train.py",
             one("(loss * (world_size / max(n_supervised, 1))).backward()",
                 "(loss * (world_size / max(int((y != IGNORE_INDEX).sum()), 1))).backward()")),
    Mutation("step_count_of_examples", "the step's loss divided by its examples, not its trained tokens",
             "train.py", one("n_supervised = int(supervised[batch].sum())", "n_supervised = len(batch)")),
    # ---- the loss: the fused output head and cross-entropy (model._HeadLoss) ----
    Mutation("loss_grad_keeps_the_target", "the fused loss's gradient is the softmax alone, without - one_hot(target)",
             "model.py", one("        e.scatter_add_(1, t[:, None], -grad[:, None])  # - one_hot(target) * grad\n", ""),
             RECIPE + ("tests/test_model.py",)),
    Mutation("loss_counts_ignored_targets", "the fused loss counts the ignored positions (target 0)", "model.py",
             one("        grad = torch.where(valid, grad, 0.0)\n", ""), RECIPE + ("tests/test_model.py",)),
    # ---- packing: an example trains as it would alone ----
    Mutation("packing_ignored_in_the_step", "train_step runs the packed batch as one sequence", "train.py",
             one('loss = model(x, y, cu_seqlens=cu, reduction="sum")  # no logits',
                 'loss = model(x, y, reduction="sum")  # no logits')),
    Mutation("attention_crosses_examples", "the reference attention ignores the example boundaries",
             "kernels/attention.py", one("    if cu_seqlens is None:\n        return F.scaled_dot_product_attention",
                                         "    if True:\n        return F.scaled_dot_product_attention"),
             RECIPE + ("tests/test_model.py",)),
    # ---- trimming at 2,048 tokens, keeping the start ----
    Mutation("trim_keeps_the_end", "a long example keeps its last 2,048 tokens", "data.py",
             one("t, m = t[:max_len], m[:max_len]", "t, m = t[-max_len:], m[-max_len:]"),
             RECIPE + ("tests/test_prepare_data.py",)),
    Mutation("trim_at_4096", "--max_len defaults to 4,096", "prepare_data.py",
             one("max_len: int = field(default=2048", "max_len: int = field(default=4096")),
    # ---- decoding (LIMA §5) ----
    Mutation("penalty_divides_negatives", "the repetition penalty divides negative logits too", "generate.py",
             one("scaled = torch.where(logits < 0, logits * penalty, logits / penalty)", "scaled = logits / penalty"),
             RECIPE + ("tests/test_sample.py",)),
    Mutation("penalty_on_the_prompt", "the prompt's tokens penalised by default", "generate.py",
             one("penalize_prompt: bool = field(default=False", "penalize_prompt: bool = field(default=True")),
    Mutation("penalty_off", "repetition penalty 1.0 by default", "generate.py",
             one("repetition_penalty: float = field(default=1.2", "repetition_penalty: float = field(default=1.0")),
    Mutation("generated_not_penalised", "tokens generated are never added to the penalised set", "generate.py",
             one("penalized.scatter_(1, nxt[:, None], True)", "penalized.scatter_(1, nxt[:, None], False)"),
             RECIPE + ("tests/test_sample.py",)),
    Mutation("temperature_1", "temperature 1.0 by default", "generate.py",
             one("temperature: float = field(default=0.7", "temperature: float = field(default=1.0")),
    Mutation("top_p_095", "top-p 0.95 by default", "generate.py",
             one("top_p: float = field(default=0.9,", "top_p: float = field(default=0.95,")),
    Mutation("top_p_drops_crossing_token", "the nucleus stops before the token that crosses p", "generate.py",
             one("drop = mass_before >= top_p", "drop = mass_before + probs > top_p"),
             RECIPE + ("tests/test_sample.py",)),
    Mutation("temperature_after_top_p", "the nucleus chosen before the temperature", "generate.py",
             one("probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)",
                 "probs = (top_p_filter(logits, top_p) / temperature).softmax(dim=-1)"),
             RECIPE + ("tests/test_sample.py",)),
    Mutation("sampling_biased", "the exponential race multiplies instead of divides", "generate.py",
             one("(probs / e).argmax(dim=-1)", "(probs * e).argmax(dim=-1)"), RECIPE + ("tests/test_sample.py",)),
    Mutation("no_stop_at_eot", "decoding stops at EOS only, not at the end of turn", "generate.py",
             one("return (tokenizer.eot_id, tokenizer.eos_id)", "return (tokenizer.eos_id,)"),
             ("tests/test_sample.py",)),
    Mutation("context_4096", "prompt + response up to 4,096 tokens by default", "generate.py",
             one("max_seq_len: int = field(default=2048", "max_seq_len: int = field(default=4096")),
    # ---- RMSNorm and attention where the numbers' scale matters ----
    Mutation("rmsnorm_triton_eps_outside_sqrt", "Triton RMSNorm: 1 / (sqrt(mean(x^2)) + eps)", "kernels/rmsnorm.py",
             one("rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)",
                 "rstd = 1.0 / (tl.sqrt(tl.sum(xf * xf, axis=1) / N) + eps)"), ("tests/test_kernels.py",)),
    Mutation("rmsnorm_triton_no_eps", "Triton RMSNorm without eps", "kernels/rmsnorm.py",
             one("rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)",
                 "rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N)"), ("tests/test_kernels.py",)),
    Mutation("rmsnorm_reference_eps_outside_sqrt", "the PyTorch RMSNorm: x / (sqrt(mean(x^2)) + eps)",
             "kernels/rmsnorm.py", one("y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)",
                                       "y = xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps)")),
    Mutation("final_norm_eps_fixed", "the final norm's eps fixed at 1e-6, not the model's", "model.py",
             one("self.norm = RMSNorm(args.dim, args.norm_eps)", "self.norm = RMSNorm(args.dim, 1e-6)")),
    Mutation("attention_softmax_no_max", "Triton attention's softmax without the running max (overflows)",
             "kernels/attention.py", one("m_new = tl.maximum(m_i, tl.max(s, axis=1))", "m_new = tl.maximum(m_i, 0.0)"),
             ("tests/test_kernels.py",)),
    Mutation("attention_dq_unstable", "Triton attention's dq: exp(s) / exp(lse), not exp(s - lse)",
             "kernels/attention.py", one("p = tl.exp2(s - lse[:, None])", "p = tl.exp2(s) / tl.exp2(lse[:, None])"),
             ("tests/test_kernels.py",)),
    # ---- Llama 3.x: RoPE scaling, the tied head ----
    Mutation("rope_scaling_inverted", "Llama 3.1 RoPE scaling multiplies long wavelengths' frequency", "model.py",
             one("inv_freq / s.factor, blended)", "inv_freq * s.factor, blended)"), ("tests/test_model.py",)),
    Mutation("tied_head_untied", "Llama 3.2's output head not tied to the embedding", "model.py",
             one("            self.output.weight = self.tok_embeddings.weight\n", "            pass\n"),
             ("tests/test_model.py",)),
]


@dataclass
class MutationsConfig:
    """Plant each bug of the list in a scratch copy of the repository and run the tests that
    should catch it."""
    only: list[str] = field(default_factory=list, metadata={"help": "run these mutations (names) only"})
    full: bool = field(default=False, metadata={"help": "run the whole suite for each mutation, not its own tests"})
    list_only: bool = field(default=False, metadata={"help": "list the mutations and whether their code is found, then stop"})
    timeout: int = field(default=1800, metadata={"help": "seconds one mutation's tests may take", "min": 1})
    keep: bool = field(default=False, metadata={"help": "keep the scratch copy (its path is printed)"})


def tracked_files(root):
    """What git would check out here, plus files not yet committed that are not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout.decode()
    return sorted({p for p in out.split("\0") if p and os.path.isfile(os.path.join(root, p))})


def copy_repo(root, dest):
    for path in tracked_files(root):
        os.makedirs(os.path.join(dest, os.path.dirname(path)), exist_ok=True)
        shutil.copy2(os.path.join(root, path), os.path.join(dest, path))


def mutate(text, mutation):
    """The text with the mutation's first applicable edit made, or None."""
    for old, new in mutation.edits:
        if text.count(old) == 1:
            return text.replace(old, new)
    return None


def pytest_command(tests):
    return [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]


FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_tests(copy, tests, timeout):
    """-> (pytest's exit code or None on timeout, the first failing test, seconds)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no stale bytecode between mutations
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(pytest_command(tests), cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", time.perf_counter() - t0
    first = FAILED.search(proc.stdout)
    detail = first.group(2).replace("tests/", "") if first else proc.stdout.strip().splitlines()[-1:]
    return proc.returncode, detail if isinstance(detail, str) else " ".join(detail), time.perf_counter() - t0


def verdict(code):
    # pytest: 0 all passed, 1 some failed, 2 interrupted (a collection error), 5 nothing collected
    return {None: "timeout", 0: "missed", 1: "caught"}.get(code, "broken")


def print_table(rows):
    head = ("mutation", "file", "tests", "result", "s")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main(argv=None):
    cfg = parse_config(MutationsConfig, argv)
    chosen = MUTATIONS
    if cfg.only:
        unknown = sorted(set(cfg.only) - {m.name for m in MUTATIONS})
        if unknown:
            raise SystemExit(f"error: no mutation named {', '.join(unknown)}; --list_only shows them")
        chosen = [m for m in MUTATIONS if m.name in cfg.only]
    if cfg.list_only:
        for m in chosen:
            with open(os.path.join(ROOT, m.file)) as f:
                found = mutate(f.read(), m) is not None
            print(f"{m.name:36s} {m.file:22s} {'found    ' if found else 'NOT FOUND'}  {m.what}")
        return 0
    copy = tempfile.mkdtemp(prefix="lima-mutations-")
    try:
        copy_repo(ROOT, copy)
        print(f"scratch copy: {copy}", file=sys.stderr)
        every = ["tests"] if cfg.full else sorted({t for m in chosen for t in m.tests})
        code, detail, seconds = run_tests(copy, every, cfg.timeout)
        if code != 0:
            raise SystemExit(f"error: with no mutation, {' '.join(every)} do not pass ({detail}, exit "
                             f"{code}): a mutation cannot be caught by tests that fail anyway. Fix them first.")
        print(f"no mutation: {' '.join(every)} pass ({seconds:.0f} s)", file=sys.stderr)
        rows, started = [], time.perf_counter()
        for i, m in enumerate(chosen):
            path = os.path.join(copy, m.file)
            with open(path) as f:
                original = f.read()
            mutated = mutate(original, m)
            tests = ["tests"] if cfg.full else list(m.tests)
            shown = "all" if cfg.full else " ".join(t.replace("tests/", "") for t in m.tests)
            if mutated is None:
                rows.append((m.name, m.file, shown, "pattern not found", 0))
            else:
                with open(path, "w") as f:
                    f.write(mutated)
                try:
                    code, detail, seconds = run_tests(copy, tests, cfg.timeout)
                finally:
                    with open(path, "w") as f:
                        f.write(original)
                result = verdict(code)
                rows.append((m.name, m.file, shown, f"{result}: {detail}" if result != "missed" else result,
                             round(seconds)))
            spent = time.perf_counter() - started
            left = spent / (i + 1) * (len(chosen) - i - 1)
            print(f"[{i + 1}/{len(chosen)}] {rows[-1][0]}: {rows[-1][3]} ({rows[-1][4]} s; "
                  f"{spent / 60:.0f} min so far, about {left / 60:.0f} min left)", file=sys.stderr, flush=True)
    finally:
        if cfg.keep:
            print(f"kept: {copy}", file=sys.stderr)
        else:
            shutil.rmtree(copy, ignore_errors=True)
    print_table(rows)
    bad = [r for r in rows if not r[3].startswith("caught")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} caught" + (f"; not caught: {', '.join(r[0] for r in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
