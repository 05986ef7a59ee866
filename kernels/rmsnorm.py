"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight  (LLaMA, LIMA.md §2).

Statistics are computed in fp32 and the normalised value is cast back to the input dtype
before it is multiplied by the weight, exactly as Meta's reference does.
"""

import torch


def rms_norm_reference(x, weight, eps):
    # x: (..., dim), weight: (dim,)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.type_as(x) * weight
