"""A training run's output directory: one run per directory, continued only as that run.

train.py writes into out_dir: metrics.jsonl (a line per optimizer step), dev.jsonl (the dev loss
of each epoch), training_curves.png (both drawn), dev_generations/epoch_NN.jsonl, epoch_NN/
(checkpoints), resume/ (the state of the last finished epoch) and train_config.json. Here: which of those an earlier run left, what
--resume and --overwrite may do with them (`claim_out_dir`, called by rank 0 holding the
directory's lock), what makes a resumed run the same run (`run_identity`, `check_same_run`),
the logs trimmed to the resume point, and what to tell a user whose run stopped (`kept`,
`continue_command`).
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import asdict

import data
import distributed
import files
import report


def earlier_run(out_dir):
    """The files a run of train.py leaves in out_dir (only these names: nothing else is ours)."""
    if not os.path.isdir(out_dir):
        return []
    ours = ("metrics.jsonl", "dev.jsonl", report.TRAINING_CURVES, "train_config.json", "dev_generations",
            distributed.RESUME, distributed.RESUME + ".tmp", distributed.RESUME + ".old")
    return sorted(n for n in os.listdir(out_dir) if n in ours or re.fullmatch(r"epoch_\d+", n))


def claim_out_dir(cfg):
    """Rank 0, holding out_dir's lock, before anything is loaded: clean up what a killed run
    left, then start where asked: --resume from the newest complete resume state; --overwrite
    after deleting the earlier run; otherwise only in a directory that holds no run."""
    out = cfg.out_dir
    for folder in (out, os.path.join(out, "dev_generations")):
        files.remove_stale(folder)  # .epoch_NN.tmp-*: a full model each at 65B
    earlier = earlier_run(out)
    if cfg.resume:
        if distributed.recover_resume(out) is None:
            raise ValueError(
                f"--resume: {out} holds no resume state; it is written at the end of each epoch"
                f"{', and the run there stopped before its first one ended' if earlier else ''}. "
                f"Start without --resume{' and with --overwrite' if earlier else ''}.")
    elif earlier:
        if not cfg.overwrite:
            raise ValueError(
                f"{out} holds an earlier run ({', '.join(earlier[:6])}{', ...' if len(earlier) > 6 else ''}). "
                f"Continue it with --resume, delete it and start again with --overwrite, or choose "
                f"another --out_dir.")
        for name in earlier:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"--overwrite: deleted the earlier run in {out} ({', '.join(earlier)})", file=sys.stderr)


def data_sha256(data_dir):
    """The prepared data's identity: its token, mask and offset arrays (not meta.json, which
    holds paths)."""
    h = hashlib.sha256()
    for split in ("train", "dev"):
        for part in ("tokens", "mask", "offsets"):
            path = os.path.join(data_dir, f"{split}.{part}.npy")
            if os.path.isfile(path):
                h.update(f"{split}.{part}\0".encode())
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()


# Settings a resumed run must share with the run it continues: they change what is trained
# (the schedule, the batches, the updates, the dropout). Free to differ: where things are
# (init_from, tokenizer, data_dir paths; the weights come from the resume state, and the data
# and tokenizer are compared by content), the device and number of ranks, how a step is
# computed (micro_batch_tokens, activation_checkpointing, cpu_offload: the same sums), when to
# stop (max_steps, force) and what to write at the end of an epoch (save_epochs,
# generate_every_epoch, dev_max_new_tokens).
SAME_RUN = ("epochs", "batch_size", "lr", "min_lr", "beta1", "beta2", "weight_decay", "grad_clip",
            "resid_dropout", "seed")


def run_identity(cfg, meta, args, device):
    identity = {name: getattr(cfg, name) for name in SAME_RUN}
    identity.update(
        param_dtype=str(distributed.param_dtype(cfg)).removeprefix("torch."),
        compute_dtype=str(distributed.compute_dtype(cfg, device)).removeprefix("torch."),
        data_sha256=data_sha256(cfg.data_dir), tokenizer_sha256=meta["tokenizer_sha256"],
        model=asdict(args))
    return json.loads(json.dumps(identity))  # as state.json will hold it


def check_same_run(saved, now, path):
    """--resume continues a run, never another one: every difference is named."""
    saved = saved if isinstance(saved, dict) else {}
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"the model's {k} ({a.get(k)!r} there, {b.get(k)!r} now)"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b and key.endswith("sha256"):  # data_sha256, tokenizer_sha256
            what = "the prepared data" if key.startswith("data") else "the tokenizer"
            diffs.append(f"{what} (sha256 {str(a)[:12]}... there, {str(b)[:12]}... now)")
        elif a != b:
            diffs.append(f"--{key} ({a!r} there, {b!r} now)")
    if diffs:
        raise ValueError(
            f"--resume: this is not the run saved in {path}: {'; '.join(diffs)}. Resume with its "
            f"settings and data (its train_config.json lists the settings), or start a new run in "
            f"another --out_dir.")


def _numbered(key):
    def parse(row):
        if not isinstance(row.get(key), int):
            raise data.DataError(f"no integer '{key}' (a line of train.py's log?)")
        return row
    return parse


def start_logs(cfg, rank, step, epoch):
    """metrics.jsonl (a line per step) and dev.jsonl (a line per epoch). A resumed run keeps
    exactly the lines before its resume point (step, epoch): the killed run may have logged
    more, and its last line may be torn (cut off). Rewritten atomically; a fresh run finds
    neither. -> the path of metrics.jsonl."""
    out = cfg.out_dir
    metrics = os.path.join(out, "metrics.jsonl")
    if rank == 0:
        if cfg.resume:
            for name, key, end in (("metrics.jsonl", "step", step), ("dev.jsonl", "epoch", epoch + 1)):
                path = os.path.join(out, name)
                if os.path.exists(path):
                    rows = data.read_jsonl(path, _numbered(key), repair_tail=True)
                    data.write_jsonl(path, [row for _, row in rows if row[key] < end])
        files.write_json(os.path.join(out, "train_config.json"), asdict(cfg))
    return metrics


def last_state(out_dir):
    """The state.json of the resume state a --resume would continue from, or None."""
    try:
        found = distributed.find_resume(out_dir)
    except (OSError, ValueError):  # damaged: --resume will say so
        return None
    return found and found[1]


def kept(out_dir):
    """What a stopped run leaves to continue from, in words."""
    state = last_state(out_dir)
    saved = [name for name in earlier_run(out_dir) if name.startswith("epoch_")]
    what = (f"the resume state of epoch {state['epoch']} (step {state['step']})" if state
            else "no resume state (the first is written at the end of epoch 1)")
    return what + (f" and checkpoints {', '.join(saved)}" if saved else "")


def continue_command(argv, resume):
    """The command line that continues (or restarts) this run: the same flags, with --resume
    (or --overwrite), under the same launcher."""
    flags = [a for a in argv if a not in ("--resume", "--no-resume", "--overwrite", "--no-overwrite")]
    flags.append("--resume" if resume else "--overwrite")
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" not in os.environ or world == "1":
        launcher = "python train.py"
    elif local == world:
        launcher = f"torchrun --nproc_per_node={local} train.py"
    else:
        launcher = "torchrun <the same options, on every node> train.py"
    return f"{launcher} {shlex.join(flags)}"
