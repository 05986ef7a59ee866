"""The one Triton import of both kernels, and the constants they share.

Without Triton installed the kernels' modules still import (the decorators and annotations
below become no-ops) and kernels/__init__.py runs the PyTorch references instead.
"""

import math
import os
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b),
                             next_power_of_2=lambda n: 1 << (n - 1).bit_length())
    tl = SimpleNamespace(constexpr=lambda value=None: value)
    HAS_TRITON = False

# triton.jit reads TRITON_INTERPRET when it decorates: the kernels run on CPU tensors (numpy,
# for tests) only if it was set before the kernel modules were imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

LOG2E = math.log2(math.e)  # scores in log2 units let the kernels use exp2
LN2 = math.log(2.0)
# the same two, as compile-time constants inside kernels
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


def poisoned_empty(shape, dtype, device):
    """torch.empty, NaN-filled when LIMA_KERNELS_POISON=1 (the tests): an output element that no
    kernel wrote then fails the comparison."""
    import torch
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if os.environ.get("LIMA_KERNELS_POISON") == "1" else out
