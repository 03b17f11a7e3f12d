"""Sampled completions as training batches: what GRPO and on-policy distillation share.

A rollout is a prompt's token ids and the completion the engine sampled for it; `RolloutBatch` holds one RL
step's groups of them with their rewards. `pack_completions` lays a batch
of them out as right-padded rows with a mask over the completion tokens (the only positions any loss reads);
`completion_logprobs` scores those tokens under a model; `completion_logits` returns the full next-token logits
there (for losses that compare whole distributions, like on-policy distillation's reverse KL).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .losses import token_logprobs


@dataclass
class RolloutBatch:
    """One RL step's samples: `group_size` completions of each of `rewards.shape[0]` prompts, group by group
    (sequence i belongs to group i // G). Per-sequence lists have one entry per sequence; `routes` is None for a
    dense model or when the engine's routing could not be rebuilt (routing.RoutingCapture)."""

    prompts: list[list[int]]  # prompt token ids
    completions: list[list[int]]  # sampled token ids
    rewards: torch.Tensor  # (groups, G)
    pad: int  # the tokenizer's pad id (pack_completions)
    logprobs: list[list[float]] | None = None  # the engine's log p of each sampled token
    texts: list[str] = field(default_factory=list)  # decoded completions
    scores: list[dict] = field(default_factory=list)  # the task's score components ("accuracy", "format", "partial")
    truncated: list[bool] = field(default_factory=list)  # stopped by the length limit
    routes: list[torch.Tensor] | None = None  # per sequence (n_moe, T_i, K) expert ids
    step_rewards: list[list[float]] = field(default_factory=list)  # per sequence, its steps' rewards (process reward)
    token_steps: list[list[int]] = field(default_factory=list)  # per sequence, the step of each completion token
    problem_ids: list[str] = field(default_factory=list)  # per group
    questions: list[str] = field(default_factory=list)  # per group
    rollout_s: float = 0.0  # wall time of the sampling

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def select(self, keep: list[bool]) -> "RolloutBatch":
        """The batch restricted to the groups where keep is True."""
        G = self.group_size
        seqs = [i for i in range(len(self.completions)) if keep[i // G]]
        per_seq = {name: [v[i] for i in seqs] if (v := getattr(self, name)) else v for name in _PER_SEQUENCE}
        per_group = {name: [x for x, k in zip(getattr(self, name), keep) if k] for name in _PER_GROUP}
        return RolloutBatch(**per_seq, **per_group, rewards=self.rewards[torch.tensor(keep, dtype=torch.bool)],
                            pad=self.pad, rollout_s=self.rollout_s)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Several batches as one (their groups in order; routes only if every batch has them)."""
        per_seq = {name: [x for b in batches for x in (getattr(b, name) or [])] for name in _PER_SEQUENCE}
        per_seq["logprobs"] = per_seq["logprobs"] if all(b.logprobs for b in batches) else None
        per_seq["routes"] = per_seq["routes"] if all(b.routes for b in batches) else None
        per_group = {name: [x for b in batches for x in getattr(b, name)] for name in _PER_GROUP}
        return RolloutBatch(**per_seq, **per_group, rewards=torch.cat([b.rewards for b in batches]),
                            pad=batches[0].pad, rollout_s=sum(b.rollout_s for b in batches))


_PER_SEQUENCE = ("prompts", "completions", "logprobs", "texts", "scores", "truncated", "routes", "step_rewards",
                 "token_steps")
_PER_GROUP = ("problem_ids", "questions")


def steps_of_tokens(decode, tokens: list[int], step_ends: list[int]) -> list[int]:
    """The step each token of a completion belongs to: the first step ending after the token's first character
    (`decode` turns a token prefix into text; tokens past the last step's end belong to the last step)."""
    out, start = [], 0
    for i in range(len(tokens)):
        out.append(next((j for j, end in enumerate(step_ends) if end > start), len(step_ends) - 1))
        start = len(decode(tokens[:i + 1]))
    return out


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
