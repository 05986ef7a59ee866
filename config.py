"""One dataclass per script holds its defaults; this turns it into argparse flags.

    @dataclass
    class SampleConfig:
        temperature: float = field(default=0.7, metadata={"help": "LIMA §5"})

    cfg = parse_config(SampleConfig, presets={"greedy": {"temperature": 0.0}})

Every field becomes `--name` with its default and help text in `-h`; bools become
`--name / --no-name`. `--preset NAME` applies a named dict of overrides first, then any
flag given on the command line wins. Unknown flags are errors (no silent typos).

A field's valid values live in its metadata and are checked when the command line is read
(`check_ranges`), so a bad value is refused by name before any work:

    top_p: float = field(default=0.9, metadata={"gt": 0, "max": 1})     # (0, 1]
    batch_size: int = field(default=16, metadata={"min": 1})
    save_epochs: list[int] = field(..., metadata={"min": 1, "max": "epochs"})   # another field
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32")})

`min` and `max` are inclusive, `gt` an exclusive lower bound; a field's name instead of a number
means that field's value; None (an Optional left unset) is always allowed; a list's every
element is checked; every float must be finite.
"""

import argparse
import dataclasses
import math
import typing


def _parse_optional(inner):
    def parse(text):
        return None if text.lower() in ("none", "") else inner(text)
    parse.__name__ = inner.__name__
    return parse


def build_parser(cls, presets=None, description=None):
    parser = argparse.ArgumentParser(
        description=description or cls.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)  # no silent prefixes
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="named overrides applied before the flags given here")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        valid = describe_range(f.metadata)
        text = f.metadata.get("help", " ") + f" (default: {default!r}{'; ' + valid if valid else ''})"
        kwargs = dict(default=argparse.SUPPRESS, help=text.replace("%", "%%"))  # argparse formats help with %
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is typing.Union and type(None) in args:  # Optional[X]
            inner = next(a for a in args if a is not type(None))
            parser.add_argument(f"--{f.name}", type=_parse_optional(inner), **kwargs)
        elif typing.get_origin(kind) in (list, tuple):  # list[int]: --epochs_to_save 5 6 7
            parser.add_argument(f"--{f.name}", type=args[0], nargs="*", **kwargs)
        else:
            parser.add_argument(f"--{f.name}", type=kind, **kwargs)
    return parser


def parse_config(cls, argv=None, presets=None, description=None):
    """Defaults < preset < command line, range-checked. Returns an instance of `cls`."""
    parser = build_parser(cls, presets, description)
    ns = vars(parser.parse_args(argv))
    values = {}
    preset = ns.pop("preset", None)
    if preset is not None:
        values.update(presets[preset])
    values.update(ns)
    cfg = cls(**values)
    try:
        check_ranges(cfg)
    except ValueError as e:
        parser.error(str(e))  # usage, the message, exit status 2: as for a value of the wrong type
    return cfg


def describe_range(metadata):
    """The valid values a field's metadata allows, in words ("" when any value goes)."""
    if "choices" in metadata:
        return "one of " + ", ".join(map(str, metadata["choices"]))
    low = (f"at least {_shown(metadata['min'])}" if "min" in metadata else
           f"greater than {metadata['gt']}" if "gt" in metadata else None)
    high = f"at most {_shown(metadata['max'])}" if "max" in metadata else None
    return " and ".join(x for x in (low, high) if x)


def _shown(bound):
    return f"--{bound}" if isinstance(bound, str) else bound


def check_ranges(cfg):
    """Every field's value against its metadata (min, max, gt, choices; a bound may name another
    field), and every float finite: ValueError naming the flag and what it may be, for the first
    value outside. parse_config calls it, and so may code that builds a config itself."""
    for f in dataclasses.fields(cfg):
        m, value = f.metadata, getattr(cfg, f.name)

        def bound(key):
            b = m.get(key)
            return getattr(cfg, b) if isinstance(b, str) else b
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is None or isinstance(v, bool):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"--{f.name} {v!r}: must be a finite number")
            lo, hi, gt = bound("min"), bound("max"), m.get("gt")
            ok = (("choices" not in m or v in m["choices"]) and (lo is None or v >= lo)
                  and (gt is None or v > gt) and (hi is None or v <= hi))
            if not ok:
                named = {k: f" ({bound(k)})" for k in ("min", "max") if isinstance(m.get(k), str)}
                raise ValueError(f"--{f.name} {v!r}: must be {describe_range(m)}"
                                 + "".join(named.values()))


# ---- "auto" devices and dtypes: resolved here, spelled as torch spells them -------------------

DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(name="auto"):
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is kept as given."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible here (torch.cuda."
                         f"is_available() is False); use --device cpu")
    return name


def resolve_dtype(name, device):
    """"auto" -> bfloat16 on a GPU, float32 on a CPU; else one of DTYPES, as a torch dtype."""
    import torch
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    return getattr(torch, name)


# ---- CPU threads: one policy for every script ---------------------------------------------------

WIDE = 2048  # model width from which torch's CPU ops are long enough to share out


def set_cpu_threads(width, device):
    """torch's CPU threads for a model of this width (ModelArgs.dim) on `device`; returns the
    number. OMP_NUM_THREADS in the environment wins, and a GPU run keeps torch's default.

    Otherwise: one thread below WIDE, the cores this process may run on from it. Every op of a
    narrow model takes microseconds; split over threads, each op waits for the slowest, and on
    a machine busy with other work one descheduled (or spinning) thread stalls every op. With a
    thread per core (torch's default) the README's demo (width 128) took 36 minutes on a busy
    2-core machine, 78 s with one thread. Forward passes measured on a 2-core EPYC under a load
    average of ~8, 2 threads against 1: width 128, 50x slower; width 512, 10x; width 2048,
    1.6-1.8x: from there each op is long enough that a busy core slows it by about its share,
    and on a quiet machine the cores are worth having."""
    import os

    import torch
    if "OMP_NUM_THREADS" in os.environ or not str(device).startswith("cpu"):
        return torch.get_num_threads()
    torch.set_num_threads(1 if width < WIDE else usable_cores())
    return torch.get_num_threads()


def usable_cores():
    """The cores this process may run on (its affinity mask where the OS has one)."""
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
