"""One dataclass per script holds its defaults; this turns it into argparse flags.

    @dataclass
    class SampleConfig:
        temperature: float = field(default=0.7, metadata={"help": "LIMA §5"})

    cfg = parse_config(SampleConfig, presets={"greedy": {"temperature": 0.0}})

Every field becomes `--name` with its default and help text in `-h`; bools become
`--name / --no-name`. `--preset NAME` applies a named dict of overrides first, then any
flag given on the command line wins. Unknown flags are errors (no silent typos).

Valid values live in the field's metadata and are checked when the command line is read:
`min` and `max` (inclusive; for a list, each element; a field's name instead of a number means
that field's value, e.g. save_epochs' "max": "epochs") and `choices` (the fixed values of a
string). A value out of range is one message naming the flag, never a run that goes wrong later.
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


def _valid(f):
    """The valid values of a field, for its help text."""
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and hi is not None:
        return f" [{lo}..{hi}]"
    if lo is not None:
        return f" [>= {lo}]"
    return f" [<= {hi}]" if hi is not None else ""


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
        text = f.metadata.get("help", " ") + _valid(f) + f" (default: {default!r})"
        kwargs = dict(default=argparse.SUPPRESS, help=text.replace("%", "%%"))  # argparse formats help with %
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is typing.Union and type(None) in args:  # Optional[X]
            inner = next(a for a in args if a is not type(None))
            if "choices" in kwargs:
                kwargs["choices"] = [*kwargs["choices"], None]
            parser.add_argument(f"--{f.name}", type=_parse_optional(inner), **kwargs)
        elif typing.get_origin(kind) in (list, tuple):  # list[int]: --epochs_to_save 5 6 7
            parser.add_argument(f"--{f.name}", type=args[0], nargs="*", **kwargs)
        else:
            parser.add_argument(f"--{f.name}", type=kind, **kwargs)
    return parser


def check_ranges(cfg):
    """Every field's value against its metadata's `min`, `max` and `choices`; a float must be
    finite. Raises ValueError naming the flag; parse_config calls it, and so may code that
    builds a config itself."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or isinstance(v, bool):
                continue
            choices = f.metadata.get("choices")
            if choices is not None and v not in choices:
                raise ValueError(f"--{f.name} {v}: expected one of {', '.join(map(str, choices))}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"--{f.name} {v}: must be a finite number")
            for key, word in (("min", "at least"), ("max", "at most")):
                bound = f.metadata.get(key)
                shown = bound
                if isinstance(bound, str):  # another field's value
                    bound = getattr(cfg, bound)
                    shown = f"--{f.metadata[key]} ({bound})"
                if bound is None or not isinstance(v, (int, float)):
                    continue
                if (v < bound) if key == "min" else (v > bound):
                    raise ValueError(f"--{f.name} {v}: must be {word} {shown}")


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
        parser.error(str(e))  # usage, the message, exit status 2: as argparse's own errors
    return cfg


# ---- "auto" devices and dtypes: resolved here, spelled as torch spells them -------------------

DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(name="auto"):
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is kept as given."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
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
