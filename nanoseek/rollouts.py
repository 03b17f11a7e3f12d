"""Sampled completions as training batches: what GRPO and on-policy distillation share.

A rollout is a prompt's token ids and the completion the engine sampled for it. `pack_completions` lays a batch
of them out as right-padded rows with a mask over the completion tokens (the only positions any loss reads);
`completion_logprobs` scores those tokens under a model; `completion_logits` returns the full next-token logits
there (for losses that compare whole distributions, like on-policy distillation's reverse KL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import token_logprobs


def pack_completions(prompts: list[list[int]], completions: list[list[int]], pad: int):
    """Right-padded prompt+completion rows; inputs (B, L-1), targets (B, L-1), completion mask (B, L-1)."""
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    tokens = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p): len(p) + len(c)] = True
    return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


def completion_logprobs(forward, inputs, targets, mask, temperature: float = 1.0):
    """log p and entropy (B, T) of the targets under softmax(logits / temperature), zero outside `mask`; the
    output head runs on masked positions only (prompts are most of each row, and their logits are never used).
    `forward`: the model, or its mixed-precision view (runtime.prepare_for_training)."""

    def head(h, weight, k):
        return token_logprobs(F.linear(h[mask], weight).unsqueeze(0), targets[mask].unsqueeze(0), temperature)

    logp_sel, ent_sel = forward(inputs, head=head)
    logp = torch.zeros(mask.shape, dtype=logp_sel.dtype).masked_scatter(mask, logp_sel[0])
    ent = torch.zeros(mask.shape, dtype=ent_sel.dtype).masked_scatter(mask, ent_sel[0])
    return logp, ent


def completion_logits(forward, inputs, mask) -> torch.Tensor:
    """(N, V) next-token logits at the N masked (completion) positions, in row-major order."""
    return forward(inputs, head=lambda h, weight, k: F.linear(h[mask], weight))
