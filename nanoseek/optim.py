"""Optimiser, schedules and auxiliary-loss-free balancing (V3 report §2.1.2, §4.2).

- `lr_at`: V3's schedule as fractions of the run: linear warm-up, constant, cosine decay to
  min_lr_ratio × peak, then a constant tail (V3: 2.2e-4 → 2.2e-5 between 10T and 14.3T of 14.8T tokens).
- `mtp_lambda_at`: the MTP loss weight, λ = 0.3 then 0.1 (V3: switch at 10T of 14.8T tokens).
- `batch_size_at`: an optional linear batch-size ramp (V3: 3072 → 15360 sequences over 469B tokens).
- `update_routing_bias`: after every optimiser step, b_i += γ·sign(mean load − load_i) per MoE layer: overloaded
  experts become less likely to be chosen, underloaded ones more (γ = 0.001, 0 for the final 500B tokens).
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, peak: float, warmup: float = 0.02, decay_start: float = 0.676,
          decay_end: float = 0.966, min_ratio: float = 0.1) -> float:
    """Learning rate for 0-based `step` of `total` (all phases as fractions of the run)."""
    # The warm-up is a whole number of steps, and the ramp ends exactly at the peak: testing `step / total <
    # warmup` against a rounded step count overshot it (160 steps at 2%: 3 steps, but step 3 got 4/3 × peak).
    n_warmup = max(round(warmup * total), 1) if warmup > 0 else 0
    if step < n_warmup:
        return peak * (step + 1) / n_warmup
    x = step / max(total, 1)
    if x < decay_start:
        return peak
    if x < decay_end:
        progress = (x - decay_start) / (decay_end - decay_start)
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return peak * min_ratio


def mtp_lambda_at(step: int, total: int, first: float = 0.3, then: float = 0.1, switch: float = 0.676) -> float:
    return first if step / max(total, 1) < switch else then


def batch_size_at(step: int, total: int, final: int, start: int | None = None, ramp: float = 0.0) -> int:
    """Sequences per optimiser step: linear from `start` to `final` over the first `ramp` of the run."""
    if not start or ramp <= 0 or step >= ramp * total:
        return final
    return max(1, round(start + (final - start) * step / (ramp * total)))


class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW whose first and second moments are stored in bf16 (V3 report §3.3: "low-precision optimizer
    states"); master weights and gradients stay fp32 and all arithmetic is fp32. Halves the optimiser memory."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(grad, grad, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                bias1, bias2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                p.mul_(1 - lr * wd)
                p.addcdiv_(m, (v / bias2).sqrt_().add_(eps), value=-lr / bias1)


def build_optimizer(model: torch.nn.Module, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.1,
                    eps: float = 1e-8, moments: str = "fp32") -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed).

    moments="fp32": torch's fused AdamW; moments="bf16": AdamWBF16Moments.
    """
    groups = []
    for sharded in (False, True):  # FSDP's DTensors and plain tensors (EP's experts) cannot share a fused kernel
        params = [p for p in model.parameters() if p.requires_grad and hasattr(p, "to_local") == sharded]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups += [g for g in ({"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    decay = [p for g in groups for p in g["params"] if g["weight_decay"]]
    if moments == "bf16":
        return AdamWBF16Moments(groups, lr=lr, betas=betas, eps=eps)
    if moments != "fp32":
        raise ValueError(f"optimizer moments must be fp32 or bf16, got {moments!r}")
    fused = all(p.device.type in ("cpu", "cuda") for p in decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimiser's tensors (moments; not the parameters)."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def expert_loads(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, (E,) fp32, from the top-k indices (N, K)."""
    return torch.bincount(indices.flatten(), minlength=n_experts).float()


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load − 1 (Wang et al. 2024, arXiv 2408.15664): 0 is perfect balance."""
    mean = load.mean()
    return (load.max() / mean - 1).item() if mean > 0 else 0.0


@torch.no_grad()
def update_routing_bias(biases: list[torch.Tensor], loads: list[torch.Tensor], gamma: float) -> None:
    """b_i += γ · sign(mean − load_i) for each MoE layer; an exactly average expert keeps its bias."""
    if gamma == 0:
        return
    for bias, load in zip(biases, loads):
        bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)
