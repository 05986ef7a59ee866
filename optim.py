"""AdamW for bf16 master weights: the update computed in fp32, written back with stochastic
rounding, so that LIMA's small updates are kept on average instead of rounded away.

Why it is needed: bf16 keeps 8 significant bits, so a weight of magnitude w moves only when an
update exceeds about w / 256. LIMA's learning rate is 1e-5 falling to 1e-6 (LIMA §3) and Adam's
update is about the learning rate per step, on weights of about 1e-2: updates of 1e-3 of the
weight, below that resolution, so round-to-nearest returns the old weight almost every time.
Stochastic rounding rounds up with probability equal to the fraction of the gap covered, so
the expected bf16 weight is the fp32 result and the updates accumulate as they would in fp32.

Everything else is torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments,
eps added to the corrected square root). The moments are kept in the parameter's dtype and
rounded the same way. For fp32 parameters the result equals torch.optim.AdamW's.
"""

import math

import torch
from torch.distributed.tensor import DTensor


def stochastic_round_bf16(x, generator=None):
    """fp32 -> bf16, rounding up with probability (x - down) / (up - down): add 16 random bits
    below bf16's last bit of the fp32 pattern, then truncate them. Unbiased; exact where x is
    already a bf16 value; inf and NaN pass through as plain rounding would give them."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits zero: exact
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))


def _local(t):
    """The tensor this rank holds (FSDP2's parameters and states are DTensors)."""
    return t.to_local() if isinstance(t, DTensor) else t


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update in fp32; stored into bf16 parameters and moments by stochastic
    rounding (`stochastic_round_bf16`). The random bits come from (seed, step, parameter index),
    so a resumed run draws exactly what the uninterrupted one would."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    @torch.no_grad()
    def step(self, closure=None):
        index = 0
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"].item())
                w, m, v = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                g = _local(p.grad).float()
                w32, m32, v32 = w.float(), m.float(), v.float()
                w32.mul_(1 - lr * wd)  # decoupled weight decay (AdamW)
                m32.lerp_(g, 1 - beta1)
                v32.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v32.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                w32.addcdiv_(m32, denom, value=-lr / (1 - beta1 ** step))
                generator = None
                if w.dtype == torch.bfloat16:
                    generator = torch.Generator(device=w.device)
                    generator.manual_seed((self.seed * 1_000_003 + step) * 1_000_003 + index)
                for dst, src in ((w, w32), (m, m32), (v, v32)):
                    dst.copy_(stochastic_round_bf16(src, generator) if dst.dtype == torch.bfloat16 else src)
        return None
