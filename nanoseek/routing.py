"""MoE routing across the rollout/update boundary: what the engine's gates chose, compared and replayed.

An RL update recomputes the policy's forward over tokens the engine sampled. For an MoE model the update's gates
may pick other experts than the rollout's did (another precision, another batch shape, or weights changed since),
which is a source of off-policy error of its own. This module measures it and, with Rollout Routing Replay
(R3, arXiv 2510.11370), removes it:

- `RoutingCapture` records the experts every main-layer MoE gate chose while the engine decoded and rebuilds
  them per sequence from the engine's own record of which rows each decode forward ran (`Stats.decode_rows`);
- `pack_routes` lays those per-sequence routes out like `rollouts.pack_completions` lays out the tokens;
- `RoutingHooks` compares each gate's choice in the update's forward with the rollout's, and with replay uses the
  rollout's experts, recomputing their combine weights from the gate's differentiable scores (the router still
  learns);
- `completion_logprobs_routed` is `rollouts.completion_logprobs` with the hooks around it.

Shapes: routes per sequence (n_moe, T_i, K) expert ids; packed (B, n_moe, T, K), -1 past a sequence's end.
"""

from __future__ import annotations

import torch

from .model import MoE
from .rollouts import completion_logprobs


def moe_gates(model) -> list:
    """The gates of the main layers' MoE blocks, in layer order (dense layers and the MTP module excluded)."""
    return [layer.ffn.gate for layer in model.layers if isinstance(layer.ffn, MoE)]


class RoutingCapture:
    """The experts every main-layer MoE gate chose while the engine decoded, rebuilt per sequence.

    Forward hooks record each gate call: the prefill (every prompt position; a prompt repeated in a group is
    prefilled once, in torch.unique order, as the engine does) and then one call per decode step over the rows
    still running, whose prompt indices the engine reports in `Stats.decode_rows`. `per_row` returns, per
    sequence, (n_moe_layers, len(prompt) + len(completion) - 1, K) expert ids: the routing of every input position
    of the update, or None when the calls do not have that shape (an engine whose call pattern differs: the
    diagnostic is then skipped rather than wrong)."""

    def __init__(self, model):
        self.gates = moe_gates(model)
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.gates]
        self.handles = []

    def __enter__(self):
        for i, gate in enumerate(self.gates):
            self.handles.append(gate.register_forward_hook(lambda m, a, out, i=i: self.calls[i].append(out[1])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def per_row(self, prompts: list[list[int]], completions: list[list[int]],
                decode_rows: list[list[int]]) -> list[torch.Tensor] | None:
        if not self.gates:
            return None
        B, L = len(prompts), max(len(p) for p in prompts)
        padded = torch.zeros(B, L, dtype=torch.long)
        for b, p in enumerate(prompts):
            padded[b, :len(p)] = torch.tensor(p)
        unique, inverse = torch.unique(padded, dim=0, return_inverse=True)
        U = unique.shape[0]
        rows = torch.arange(B) if U == B else inverse
        out = [[] for _ in range(B)]  # per sequence, per layer: (T_b, K)
        for calls in self.calls:
            if len(calls) != len(decode_rows) + 1 or calls[0].shape[0] != U * L or any(
                    c.shape[0] != len(r) for c, r in zip(calls[1:], decode_rows)):
                return None
            K = calls[0].shape[1]
            prefill = calls[0].view(U, L, K)[rows]  # (B, L, K)
            decoded = [[] for _ in range(B)]
            for c, r in zip(calls[1:], decode_rows):
                for j, b in enumerate(r):
                    decoded[b].append(c[j])
            for b, (p, comp) in enumerate(zip(prompts, completions)):
                dec = torch.stack(decoded[b][:len(comp) - 1]) if len(comp) > 1 else prefill.new_zeros(0, K)
                if dec.shape[0] != len(comp) - 1:
                    return None
                out[b].append(torch.cat([prefill[b, :len(p)], dec]))
        return [torch.stack(layers) for layers in out]


def pack_routes(routes: list[torch.Tensor], T: int) -> torch.Tensor:
    """Per-sequence (n_moe, T_i, K) expert ids → (B, n_moe, T, K), -1 past each sequence's end."""
    n, _, K = routes[0].shape
    out = torch.full((len(routes), n, T, K), -1, dtype=torch.long)
    for i, r in enumerate(routes):
        out[i, :, : r.shape[1]] = r
    return out


class RoutingHooks:
    """During the update's forward: compare each gate's own experts with the rollout's (positions where
    `routes` >= 0), and with replay=True use the rollout's experts instead, recomputing their combine weights
    from the gate's differentiable scores (so the router still learns)."""

    def __init__(self, model, routes: torch.Tensor, replay: bool):
        self.gates, self.routes, self.replay = moe_gates(model), routes, replay  # routes (B, n_moe, T, K)
        self.mismatch: list[torch.Tensor] = []  # per gate (B, T): the expert sets differ
        self.handles = []

    def __enter__(self):
        for i, gate in enumerate(self.gates):
            self.handles.append(gate.register_forward_hook(lambda m, a, out, i=i: self._hook(m, out, i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, gate, out, i):
        weights, own, scores = out
        B, _, T, K = self.routes.shape
        target = self.routes[:, i].reshape(B * T, K)
        valid = target[:, 0] >= 0
        differ = (own.sort(dim=1)[0] != target.sort(dim=1)[0]).any(dim=1) & valid
        self.mismatch.append(differ.view(B, T))
        if not self.replay:
            return None
        idx = torch.where(valid[:, None], target, own)
        w = scores.gather(1, idx)
        if gate.normalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return (w * gate.route_scale).to(weights.dtype), idx, scores


def completion_logprobs_routed(model, forward, inputs, targets, mask, temperature, routes, replay: bool):
    """rollouts.completion_logprobs through `forward`, with the rollout's routing compared (and replayed if asked)
    on `model`'s gates when routes are given; returns (logp, entropy, mismatch (n_moe, B, T) bool or None)."""
    if routes is None:
        return (*completion_logprobs(forward, inputs, targets, mask, temperature), None)
    with RoutingHooks(model, routes, replay) as hooks:
        logp, ent = completion_logprobs(forward, inputs, targets, mask, temperature)
    return logp, ent, torch.stack(hooks.mismatch)
