"""The two ops the model calls. Which implementation runs is decided here, not in the model.

For now both are the PyTorch references (kernels/rmsnorm.py, kernels/attention.py); the Triton
kernels plug in behind these same two functions.
"""

from .attention import attention_reference
from .rmsnorm import rms_norm_reference


def rms_norm(x, weight, eps):
    return rms_norm_reference(x, weight, eps)


def attention(q, k, v, cu_seqlens=None):
    return attention_reference(q, k, v, cu_seqlens)
