"""How an operation of the model runs on the device and dtype it gets: the kernel choices model.py leaves here.

model.py says what is computed (the papers' formulas); each function below computes that one thing and picks the
kernel from its inputs alone (their device and dtype), so a model built by hand, cast by hand or moved by hand runs
the same kernels as one a stage prepared. Every choice computes what its alternatives compute, and the tests compare
them: `latent_causal` against the blockwise latent attention (model.MLA._latent_blocks), `segment_causal`'s two forms
in tests/test_packed_attention.py, the grouped experts (padded or not) against the per-expert loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packed_attention import CausalLatentAttention, masked_sdpa, segment_attention

SAVED_PROBS_LIMIT = 1 << 26  # B·H·T² up to 64M probabilities (128 MB in bf16, half that kept) per layer
KEY_MULTIPLE = 64  # cached decoding computes its keys in multiples of this (see `key_count`)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention for q (B, H, T, d), k (B, H or 1, S, d), v (B, H or 1, S, dv) with dv ≤ d,
    returning (B, H, T, dv). v is zero-padded to d and the padding sliced off the output: CPU flash attention needs
    equal qk and v head dims, and zero columns cost far less than the fallback math kernel (3× slower at our sizes)."""
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    return F.scaled_dot_product_attention(q, k, v, **kwargs)[..., :dv]


def segment_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Causal attention within each packed sample: q (B, H, T, d), k and v (B, H or 1, T, ·), segments (B, T) ->
    (B, H, T, dv). On CPU `segment_attention` multiplies only the keys each block of queries can see (its plain
    matmuls beat SDPA on those blocks); elsewhere one masked SDPA over the row (`masked_sdpa`, its reference)."""
    attend = segment_attention if q.device.type == "cpu" else masked_sdpa
    return attend(q, k, v, segments, scale)


def latent_causal(q: torch.Tensor, k: torch.Tensor, kv: torch.Tensor, segments: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """Causal attention in MLA's latent space over a whole sequence: q (B, T, H, C+R); one key k (B, T, C+R) and one
    value kv (B, T, C) shared by the H heads -> (B, T, H, C).

    On CPU, when the probabilities fit SAVED_PROBS_LIMIT, `CausalLatentAttention` (blocks of 64 positions against
    only the visible keys, probabilities kept for the backward: 1.4-1.9× faster than CPU flash attention here);
    packed samples go to `segment_causal`; otherwise SDPA with one key/value head for the H query heads (enable_gqa).
    """
    B, T, H, _ = q.shape
    if segments is None and q.device.type == "cpu" and B * H * T * T <= SAVED_PROBS_LIMIT:
        o = CausalLatentAttention.apply(q.flatten(1, 2) * scale, k, kv, H, 64)
        return o.view(B, T, H, kv.shape[-1])
    if segments is not None:
        o = segment_causal(q.transpose(1, 2), k.unsqueeze(1), kv.unsqueeze(1), segments, scale)
    else:
        o = sdpa(q.transpose(1, 2), k.unsqueeze(1), kv.unsqueeze(1), is_causal=True, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)  # (B, T, H, C)


def key_count(n: int, limit: int) -> int:
    """How many keys to compute scores against when n are visible: n rounded up to KEY_MULTIPLE, at most `limit`.
    Cached decoding's key count grows by one per token; rounded, its GEMMs reuse a few shapes (oneDNN builds a bf16
    kernel per new shape). The extra keys lie past every query's position, so the caller's mask hides them."""
    return min(limit, -(-n // KEY_MULTIPLE) * KEY_MULTIPLE)


def group_rows(dtype: torch.dtype) -> int:
    """The multiple of rows each expert's group is padded to before the grouped GEMMs in `dtype`. bf16 GEMMs go to
    oneDNN, which builds a kernel per new shape: the experts' token counts change every step, so unpadded bf16
    experts ran slower than fp32 (35 vs 8.5 ms per grouped GEMM with fresh vs recurring shapes, docs/precision.md);
    32-row groups keep the shapes few and cached. fp32 GEMMs go to MKL and need no padding."""
    return 1 if dtype == torch.float32 else 32


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows x[ends[e-1]:ends[e]] @ w[e] for every e. x: (M, in), w: (E, in, out), ends: (E,) int32. torch's grouped
    GEMM where this torch has one, else one matmul per group."""
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, w, offs=ends)
    starts = [0] + ends[:-1].tolist()
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends.tolist()))])
