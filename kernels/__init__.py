"""The two ops the model calls. Which implementation runs is decided here, not in the model.

- Triton kernels (kernels/rmsnorm.py, kernels/attention.py) when the tensors are on CUDA, or on
  CPU when TRITON_INTERPRET=1 was set before triton was first imported (Triton's interpreter:
  the real kernels, run with numpy; slow, for tests).
- Otherwise the PyTorch references beside them, which are also the spec of each op; likewise
  for what the kernels do not cover (float64, head dims that are not a power of two in 16..128,
  rows longer than 65536).
- LIMA_KERNELS=torch in the environment forces the references everywhere (read at each call).
"""

import os

from . import attention as _attention
from . import rmsnorm as _rmsnorm
from ._triton import HAS_TRITON, INTERPRET
from .attention import attention_reference
from .rmsnorm import rms_norm_reference


def _use_triton(t):
    if os.environ.get("LIMA_KERNELS") == "torch" or not HAS_TRITON:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def rms_norm(x, weight, eps):
    if _use_triton(x) and _rmsnorm.triton_supports(x, weight):
        return _rmsnorm.rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def attention(q, k, v, cu_seqlens=None):
    if _use_triton(q) and _attention.triton_supports(q, k, v):
        return _attention.attention_triton(q, k, v, cu_seqlens)
    return attention_reference(q, k, v, cu_seqlens)
