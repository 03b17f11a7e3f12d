"""Causal attention over packed samples (SFT rows), touching only the keys each block of queries can see.

A packed row holds several samples one after another; `segments` (B, T) numbers them (padding has its own id), and
a query attends to the earlier keys of its own sample only (DeepSeek-V3 §4.1: sample masking). One masked
`F.scaled_dot_product_attention` over the whole row computes every T × T score and masks most of them: with
~75-token samples in 512-token rows most of the work is masked out, and on CPU its backward was 29-30% of an SFT
step of the speedrun's models. `segment_attention` runs the queries in blocks of `block` positions, each against
only the keys from the earliest sample start any row of the block reaches up to the block's last position. The
skipped keys would contribute exactly zero, so it equals the full masked attention up to rounding (tests compare
the two, values and gradients). Plain matmuls and softmax, not SDPA: on these small blocks in bf16 the CPU flash
kernel was no faster than on the whole masked row, the plain form 2-3× faster (the SFT step: docs/results/sft_step.md).
Probabilities are rounded to the value dtype, as in `CausalLatentAttention`, the unpacked causal case (training's
fast path for MLA in the latent space, used by model.MLA), which lives here too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): the position where each position's segment starts (segments are contiguous runs)."""
    T = segments.shape[1]
    pos = torch.arange(T, device=segments.device).expand_as(segments)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(new, pos, 0).cummax(dim=1).values


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor, scale: float,
                      block: int = 64) -> torch.Tensor:
    """Causal, same-segment attention: q (B, H, T, d), k (B, Hk, T, d), v (B, Hk, T, dv) with Hk = H or 1 (one key
    and value head shared by all query heads, as in absorbed MLA), segments (B, T), each segment a contiguous run
    of positions. Returns (B, H, T, dv): what SDPA with the full causal-and-same-segment mask returns."""
    B, H, T, _ = q.shape
    Hk = k.shape[1]
    if Hk not in (1, H):
        raise ValueError(f"segment_attention: {Hk} key heads for {H} query heads (must be {H} or 1)")
    starts = segment_starts(segments)
    pos = torch.arange(T, device=q.device)
    q = q * scale
    outs = []
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        n = t1 - t0
        k0 = int(starts[:, t0].min())  # no query of the block, in any row, sees a key before k0
        visible = (pos[k0:t1] <= pos[t0:t1, None]) & (segments[:, t0:t1, None] == segments[:, None, k0:t1])
        qb, hidden = q[:, :, t0:t1], ~visible.unsqueeze(1)  # (B, 1, n, keys)
        if Hk == 1:  # the heads of a position share the keys: one (H·n × keys) matrix per row
            qb, hidden = qb.reshape(B, 1, H * n, -1), hidden.expand(B, H, n, t1 - k0).reshape(B, 1, H * n, -1)
        scores = qb @ k[:, :, k0:t1].transpose(-1, -2)
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1).to(v.dtype)
        outs.append((probs @ v[:, :, k0:t1]).view(B, H, n, -1))
    return torch.cat(outs, dim=2)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
                scale: float) -> torch.Tensor:
    """The reference: one SDPA call over the whole row with the full causal-and-same-segment mask (same shapes).
    v is zero-padded to the key width, as the model did before (the CPU flash kernel needs equal widths)."""
    T, dv = q.shape[2], v.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = (causal & (segments[:, :, None] == segments[:, None, :])).unsqueeze(1)
    o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, max(0, q.shape[-1] - dv))), attn_mask=mask, scale=scale,
                                       enable_gqa=k.shape[1] != q.shape[1])
    return o[..., :dv]


class CausalLatentAttention(torch.autograd.Function):
    """softmax(q kᵀ) v for q (B, T·H, C+R) (rows (t, h), already scaled), k (B, T, C+R), v (B, T, C), causal
    per position t = row // H: the H heads share the keys and values, so each block of query positions is one
    (rows × visible keys) matrix against only the keys it can see (the masked half of the square is skipped).

    Scores come from bf16 GEMMs, the softmax runs in fp32 and rounds the probabilities P to the value dtype, as
    the blockwise reference does. The backward reuses the kept P instead of recomputing the scores (flash-style
    kernels trade that memory for a second pass): dV = Pᵀ dO, dS = P ⊙ (dO vᵀ − rowsum(dO ⊙ O)), dq = dS k,
    dk = dSᵀ q. Masked probabilities are exactly 0, so dS needs no mask. Blocks of 64 positions measured fastest
    on CPU (small score tiles stay in cache; 128 and flash attention were 1.4-1.9× slower here).
    """

    @staticmethod
    def forward(ctx, q, k, v, heads: int, block: int):
        T = k.shape[1]
        rows = torch.arange(block * heads, device=q.device) // heads
        future = torch.arange(block, device=q.device) > rows[:, None]  # (block·H, block): the diagonal tile's mask
        probs, outs = [], []
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            scores = q[:, t0 * heads:t1 * heads] @ k[:, :t1].transpose(1, 2)  # (B, rows, t1)
            scores[..., t0:t1].masked_fill_(future[: (t1 - t0) * heads, : t1 - t0], float("-inf"))
            p = scores.softmax(dim=-1).to(v.dtype)  # (torch accumulates bf16 softmax in fp32, rounds once)
            probs.append(p)
            outs.append(p @ v[:, :t1])  # (B, rows, C)
        o = torch.cat(outs, dim=1)
        ctx.save_for_backward(q, k, v, o, *probs)
        ctx.heads, ctx.block = heads, block
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, *probs = ctx.saved_tensors
        heads, block, T = ctx.heads, ctx.block, k.shape[1]
        delta = (do.float() * o.float()).sum(-1, keepdim=True)  # (B, T·H, 1): rowsum(dO ⊙ O) = Σ P ⊙ dP
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for i, t0 in enumerate(range(0, T, block)):
            t1 = min(T, t0 + block)
            r = slice(t0 * heads, t1 * heads)
            p, do_r = probs[i], do[:, r]
            ds = torch.sub(do_r @ v[:, :t1].transpose(1, 2), delta[:, r]).mul_(p).to(q.dtype)  # (B, rows, t1)
            torch.bmm(ds, k[:, :t1], out=dq[:, r])
            dk[:, :t1] += ds.transpose(1, 2) @ q[:, r]
            dv[:, :t1] += p.transpose(1, 2) @ do_r
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None
