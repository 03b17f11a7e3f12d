"""The DeepSeek-V3 architecture: MLA + DeepSeekMoE + Multi-Token Prediction, in one readable file.

Semantics follow DeepSeek's inference code and the V3 technical report (arXiv 2412.19437 §2) and
are tested logit-exact against transformers' DeepseekV3/DeepseekV2ForCausalLM (tests/test_hf_parity.py).

Dimension letters used in shape comments:
    B batch, T query length, S key length, D model dim, H heads, C kv latent (kv_lora_rank),
    R rope dim (qk_rope_head_dim), P no-rope qk dim (qk_nope_head_dim), V value head dim,
    E routed experts, K active experts per token, N tokens (B·T), F expert width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in fp32 whatever x's dtype and rounded once to `out_dtype`.

    out_dtype None (the default) is x's dtype. A mixed-precision model (runtime.py) sets it to the compute dtype:
    the norm reading the fp32 residual stream then hands bf16 to the matmuls after it."""

    out_dtype: torch.dtype | None = None

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = self.out_dtype or x.dtype
        if not torch.is_grad_enabled():  # inference: the same operations without autograd.Function's overhead
            return _rms_norm(x, self.weight, self.eps, out_dtype)[0]
        return _RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)


def _rms_norm(x, weight, eps, out_dtype):
    """(y, r): the normed x in out_dtype and the reciprocal RMS r (B..., 1) that the backward reuses."""
    xf = x.float()
    buf = xf * xf  # x², then x·r·w in the same buffer
    r = torch.rsqrt(buf.mean(-1, keepdim=True).add_(eps))
    return torch.mul(xf, r, out=buf).mul_(weight.float()).to(out_dtype), r


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: torch's differentiates its decomposition (pow, mean, rsqrt, mul) op
    by op, which costs twice the passes over the activations. With x̂ = x·r, r = (mean(x²) + eps)^-1/2 and
    g = dy ⊙ w: dx = r·(g − x̂·mean(g ⊙ x̂)), dw = Σ_tokens dy ⊙ x̂; all in fp32 (F.rms_norm is the reference)."""

    # Each fp32 temporary is an activation-sized allocation streamed through memory, so both directions reuse one
    # buffer where a value is dead (same operations in the same order: bit-identical to the plain form, and the
    # backward ~1.5× faster on a (16, 512, 256) batch)

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        y, r = _rms_norm(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        xhat = x.float() * r
        dyf = dy.to(torch.float32, copy=True)  # a copy even when dy is fp32: it is overwritten below
        g = dyf * weight.float()
        dw = dyf.mul_(xhat).flatten(0, -2).sum(0)  # dyf now holds dy ⊙ x̂, then g ⊙ x̂
        dx = g.sub_(xhat.mul_(torch.mul(g, xhat, out=dyf).mean(-1, keepdim=True))).mul_(r)
        return dx.to(x.dtype), dw.to(weight.dtype), None, None


# ----------------------------------------------------------------------------- RoPE / YaRN


def yarn_correction_range(cfg: ModelConfig) -> tuple[float, float]:
    """Rotary pairs below `low` keep their frequency, pairs above `high` are divided by rope_factor."""
    R = cfg.qk_rope_head_dim

    def correction_dim(n_rotations: float) -> float:
        # the pair index whose wavelength fits n_rotations times into the original context
        return R * math.log(cfg.original_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, R - 1)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies (R/2,), YaRN-blended when rope_factor != 1 (V3 report §4.3)."""
    R = cfg.qk_rope_head_dim
    pos_freqs = cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    inv_freq = 1.0 / pos_freqs
    if not cfg.uses_yarn:
        return inv_freq
    low, high = yarn_correction_range(cfg)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(R // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # fraction of the original (extrapolated) frequency kept by each pair
    return (1.0 / (cfg.rope_factor * pos_freqs)) * (1 - keep) + inv_freq * keep


def rope_table(cfg: ModelConfig, n_positions: int) -> torch.Tensor:
    """e^{i·t·f_j} for t < n_positions, times HF's yarn attention_factor, as fp32 real pairs (n_positions, R/2, 2);
    torch.view_as_complex gives the complex table."""
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), rope_inv_freq(cfg))
    return torch.view_as_real(torch.polar(torch.full_like(angles, cfg.rope_attn_factor), angles))


def rope_bits(table: torch.Tensor) -> torch.Tensor:
    """An fp32 RoPE table as the int32 bit pattern a model keeps it in (`.view(torch.float32)` reads it back).

    A cast of the model (model.to(dtype), .half()) converts its floating-point tensors only: held as
    integers, the rotations keep fp32 precision whatever the weights are cast to (HF and DeepSeek compute them in
    fp32 too), while .to(device) still moves the table."""
    return table.view(torch.int32)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers, in fp32.

    x: (B, T, H, R); freqs_cis: (T, R/2) shared by the batch, or (B, T, R/2) per sequence (cached decoding).
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, R/2)
    return torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2).to(x.dtype)


class RouterLog:
    """Collects each MoE layer's (scores, indices) during a forward pass (for balancing losses and loads).

    A plain list works too in one process; this object is opaque to pytree utilities, so FSDP2's argument
    handling passes it to every block by identity instead of copying it like a list."""

    def __init__(self):
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def append(self, record) -> None:
        self.records.append(record)

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __bool__(self) -> bool:
        return bool(self.records)


class LayerCache(NamedTuple):
    """One layer's slice of the latent KV cache: what absorbed MLA needs and nothing more (576 values/token in V3)."""

    kv: torch.Tensor  # (B, S_max, C): kv_norm(c_KV)
    pe: torch.Tensor  # (B, S_max, R): the rotated shared key k_pe


class KVCache:
    """The latent cache of every layer (main, then MTP), batch rows × max_len positions; `Transformer.new_cache`
    allocates it. The engine treats it as opaque rows: it hands `main` / `mtp` to the cached forwards, takes
    `rows(start, stop)` views, and copies whole rows between caches. A row is reused by restarting at position 0:
    attention masks keys by position, so entries past a row's position are never read."""

    def __init__(self, kv: torch.Tensor, pe: torch.Tensor, n_main: int):
        self.kv, self.pe, self.n_main = kv, pe, n_main  # (layers, B, S_max, C), (layers, B, S_max, R)
        self.layers = [LayerCache(kv[i], pe[i]) for i in range(kv.shape[0])]

    @property
    def main(self) -> list[LayerCache]:
        return self.layers[: self.n_main]

    @property
    def mtp(self) -> list[LayerCache]:
        return self.layers[self.n_main:]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1, sharing this cache's storage."""
        return KVCache(self.kv[:, start:stop], self.pe[:, start:stop], self.n_main)

    def copy_rows(self, dst, src: "KVCache", src_rows) -> None:
        """self[dst] = src[src_rows] for the layers and positions src holds (dst, src_rows: index lists)."""
        n, S = src.kv.shape[0], src.kv.shape[2]
        self.kv[:n, dst, :S] = src.kv[:, src_rows]
        self.pe[:n, dst, :S] = src.pe[:, src_rows]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in the main model's cache: n_layers × (kv_lora_rank + rope dim) × dtype size."""
        return self.n_main * (self.kv.shape[-1] + self.pe.shape[-1]) * self.kv.element_size()


# ----------------------------------------------------------------------------- attention


class MLA(nn.Module):
    """Multi-head Latent Attention (V2 report §2.1, V3 report §2.1.1).

    Keys and values come from one compressed latent c_KV (C dims, RMSNorm'd) plus one rotated key k_pe (R dims)
    shared by all heads. `naive` expands the latent into per-head K/V (training form); `absorb` folds the
    up-projection W_UK into the query and W_UV after attention, so attention runs in the latent space over
    exactly what the KV cache stores: kv_norm(c_KV) and the rotated k_pe.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_lora_rank = cfg.n_heads, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = cfg.qk_head_dim, cfg.v_head_dim
        self.attn_impl, self.softmax_scale = cfg.attn_impl, cfg.softmax_scale
        H, D = cfg.n_heads, cfg.dim
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(D, H * cfg.qk_head_dim, bias=False)  # no bias even with attn_bias (as in HF)
        else:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attn_bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank)  # latent norms keep eps 1e-6 in DeepSeek's and HF's code
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attn_bias)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.attn_bias)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: LayerCache | None = None,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                attn_impl: str | None = None) -> torch.Tensor:
        """x (B, T, D). With a cache, the new latents are written at `positions` (B, T) and the queries attend to
        every cached position up to their own; freqs_cis is then per sequence (B, T, R/2). Without a cache,
        `segments` (B, T) restricts attention to keys of the same segment (packed samples, SFT). attn_impl
        ("naive" or "absorb") overrides the configured form for this call (cached decoding uses "absorb")."""
        B, T, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)  # (B, T, H, P+R)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)  # (B, S, C): the normed latent, what the absorbed cache keeps
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)  # (B, S, 1, R): one key shared by all heads
        if cache is not None:
            rows = torch.arange(B, device=x.device)[:, None]
            cache.kv[rows, positions] = kv.to(cache.kv.dtype)
            cache.pe[rows, positions] = k_pe[:, :, 0].to(cache.pe.dtype)
            S = kernels.key_count(int(positions.max()) + 1, cache.kv.shape[1])  # as in _latent_blocks
            kv, k_pe = cache.kv[:, :S], cache.pe[:, :S, None]  # (B, S, C), (B, S, 1, R)
        if (attn_impl or self.attn_impl) == "naive":
            o = self.attend_naive(q_nope, q_pe, kv, k_pe, positions, segments)
        else:
            o = self.attend_absorb(q_nope, q_pe, kv, k_pe, positions, segments)
        return self.wo(o.flatten(2))  # (B, T, H·V) -> (B, T, D)

    def attend_naive(self, q_nope, q_pe, kv, k_pe, q_pos: torch.Tensor | None = None,
                     segments: torch.Tensor | None = None) -> torch.Tensor:
        """Expand the latent into per-head keys/values and run causal SDPA. Returns (B, T, H, V).

        q_pos (B, T): each query's position among the S keys (default: the last T positions)."""
        B, S, _ = kv.shape
        H, P, V = self.n_heads, self.qk_nope_head_dim, self.v_head_dim
        k_nope, v = self.wkv_b(kv).view(B, S, H, P + V).split([P, V], dim=-1)  # (B, S, H, P), (B, S, H, V)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, P+R)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], dim=-1)  # (B, S, H, P+R)
        T = q.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, ·)
        if q_pos is None and T == S and segments is not None:  # packed samples
            return kernels.segment_causal(q, k, v, segments, self.softmax_scale).transpose(1, 2)  # (B, T, H, V)
        if q_pos is None and T == S and segments is None:
            mask, causal = None, True
        else:
            q_pos = q_pos if q_pos is not None else torch.arange(S - T, S, device=kv.device).expand(B, T)
            mask, causal = (torch.arange(S, device=kv.device) <= q_pos[..., None]).unsqueeze(1), False  # (B,1,T,S)
            if segments is not None:
                mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
        o = kernels.sdpa(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale)  # (B, H, T, V)
        return o.transpose(1, 2)  # (B, T, H, V)

    def attend_absorb(self, q_nope, q_pe, kv, k_pe, q_pos: torch.Tensor | None = None,
                      segments: torch.Tensor | None = None, block: int = 128, fused: bool = True) -> torch.Tensor:
        """Attention in the latent space (V2 report App. C): W_UK folded into q, W_UV applied after.

        Every head shares one key [c_KV | k_pe] (C+R) and one value c_KV (C), so the H heads of a query attend
        like multi-query attention ("MQA mode", as FlashMLA calls it). q_pos (B, T) gives each query's position
        among the S keys; by default the queries are the last T positions (S > T when earlier keys come from a
        cache). Over a whole sequence (no q_pos, T == S) and `fused`, `kernels.latent_causal` runs it (training's
        fast path); otherwise `_latent_blocks`, which is also its reference. Returns (B, T, H, V).
        """
        B, T, H, P = q_nope.shape
        S, C = kv.shape[1], self.kv_lora_rank
        wkv_b = self.wkv_b.weight.view(H, P + self.v_head_dim, C)  # (H, P+V, C)
        w_uk, w_uv = wkv_b[:, :P], wkv_b[:, P:]  # (H, P, C), (H, V, C)
        q_lat = torch.einsum("bthp,hpc->bthc", q_nope, w_uk)  # (B, T, H, C)
        q = torch.cat([q_lat, q_pe], dim=-1)  # (B, T, H, C+R)
        k = torch.cat([kv, k_pe[:, :, 0]], dim=-1)  # (B, S, C+R)
        if fused and q_pos is None and T == S:
            o_lat = kernels.latent_causal(q, k, kv, segments, self.softmax_scale)
        else:
            o_lat = self._latent_blocks(q, k, kv, q_pos, segments, block)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, V)

    def _latent_blocks(self, q, k, kv, q_pos: torch.Tensor | None, segments: torch.Tensor | None,
                       block: int) -> torch.Tensor:
        """The same attention with explicit scores: the H heads of a query are rows (t, h) of one matrix, and
        query positions go in blocks, each against only the keys it can see (the masked half of a causal square
        is skipped). Serves cached decoding (any q_pos). (B, T, H, C)."""
        B, T, H, _ = q.shape
        S, C = kv.shape[1], kv.shape[-1]
        q = q.flatten(1, 2) * self.softmax_scale  # (B, T·H, C+R), rows (t, h)
        if q_pos is None:
            q_pos = torch.arange(S - T, S, device=kv.device).expand(B, T)
        outs = []
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            pos = q_pos[:, t0:t1].repeat_interleave(H, dim=1)  # (B, rows): each row's position
            visible = kernels.key_count(int(pos.max()) + 1, S)  # the keys up to the block's last query (+ masked)
            scores = q[:, t0 * H:t1 * H] @ k[:, :visible].transpose(1, 2)  # (B, rows, visible)
            future = torch.arange(visible, device=kv.device) > pos[..., None]
            if segments is not None:  # packed samples never see each other
                rows_seg = segments[:, t0:t1].repeat_interleave(H, dim=1)
                future = future | (rows_seg[..., None] != segments[:, None, :visible])
            probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
            outs.append(probs @ kv[:, :visible])  # (B, rows, C)
        return torch.cat(outs, dim=1).view(B, T, H, C)


# ----------------------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) ⊙ w3 x). Dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """The router (V3 report §2.1.2, eqs. 12-16).

    Scores are sigmoid (V3) or softmax (V2) of x·W_gᵀ, in fp32. `bias` (V3's e_score_correction_bias, updated
    by auxiliary-loss-free balancing) is added for *selection only*; the combine weights are the unbiased
    scores. With expert groups, a group is scored by the sum of its top-2 biased scores (sigmoid/V3) or its
    max score (softmax/V2), and only the best n_limited_groups groups stay eligible.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.route_scale, self.normalize = cfg.score_func, cfg.route_scale, cfg.normalize_topk
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # The bias is running state, not a weight: aux-loss-free balancing adds ±γ to it after every step, and
        # hf.load_hf copies a checkpoint's fp32 bias in after casting the model to the dtype asked for. So a cast
        # of the weights (model.to(...)) leaves it an fp32 buffer, whose later updates and loads are not rounded.
        super()._apply(fn, recurse)
        self.bias.data = self.bias.data.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> combine weights (N, K) in x's dtype, expert ids (N, K), fp32 scores (N, E)."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        biased = scores + self.bias
        if self.n_groups > 1:
            grouped = biased.view(x.shape[0], self.n_groups, -1)  # (N, G, E/G)
            if self.score_func == "sigmoid":
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, G)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]  # (N, G_kept)
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            # -inf (not 0): biased sigmoid scores can be negative (DeepSeek-V3 fix 1398800)
            biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = biased.topk(self.topk, dim=-1)[1]  # (N, K)
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).to(x.dtype), indices, scores


class Experts(nn.Module):
    """The routed experts, stacked: w1, w3 (E, F, D) and w2 (E, D, F), so all of them run as grouped matmuls.

    `dispatch`, when set (expert parallelism, installed by nanoseek.dist), carries the expert-sorted token slots
    to the ranks that own their experts and back; w1..w3 then hold this rank's slice of the n_experts."""

    dispatch = None  # callable (slots, counts, experts) -> outputs; None: every expert is local

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_k weights[n,k]·expert_{indices[n,k]}(x[n]) with tokens sorted by expert. x: (N, D) -> (N, D)."""
        N, K = indices.shape
        if (self.dispatch is None and not torch.is_grad_enabled() and x.dtype == self.w1.dtype
                and type(self).matmul is Experts.matmul):  # a subclass's own GEMM numerics (FP8) keep theirs
            out = self.forward_padded(x, weights, indices)
            if out is not None:
                return out
        if self.dispatch is not None:  # expert parallelism: the sorted rows travel to the ranks owning the experts
            src, slot_pos, ends = _dispatch(indices, self.n_experts, 1)
            xs = _GatherRows.apply(x, src, slot_pos, K)  # (N·K, D): row j is token src[j] // K
            ys = self.dispatch(xs, torch.diff(ends, prepend=ends.new_zeros(1)), self)
        else:
            src, slot_pos, ends = _dispatch(indices, self.n_experts, kernels.group_rows(x.dtype))
            xs = _GatherRows.apply(x, src.clamp(max=N * K - 1), slot_pos, K)  # padding rows read any real row
            ys = self.ffn_groups(xs, ends)
        ys = _GatherRows.apply(ys, slot_pos, src, 1)  # back to (n, k) order; padding rows are never read
        return torch.bmm(weights.unsqueeze(1), ys.view(N, K, -1)).squeeze(1)  # (N, 1, K) @ (N, K, D)

    def forward_padded(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """Inference with few tokens (a decode step): every expert's group padded to the largest one, C rows, and
        the three projections as batched (E, C, ·) matmuls. On CPU a grouped GEMM is one small GEMM call per
        expert; at decode sizes (a few rows each) the calls cost more than the arithmetic, and one bmm is ~3×
        faster (bench: 16 experts, 64 tokens). Returns None (use the grouped path) when padding would more than
        double the rows, e.g. a long prefill with unbalanced routing. forward_loop is the reference."""
        N, K = indices.shape
        E = self.w1.shape[0]
        flat = indices.flatten()
        counts = torch.bincount(flat, minlength=E)
        C = -(-int(counts.max()) // 8) * 8  # a multiple of 8 keeps the bmm shapes few
        if E * C > 2 * N * K:
            return None
        order = flat.argsort(stable=True)  # slots grouped by expert id
        expert = flat[order]
        rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
        xs = x.new_zeros(E, C, x.shape[-1])
        xs[expert, rank] = x[order // K]
        h = self.act(torch.bmm(xs, self.w1.transpose(1, 2)), torch.bmm(xs, self.w3.transpose(1, 2)))
        y = torch.bmm(h, self.w2.transpose(1, 2))  # (E, C, D)
        ys = x.new_empty(N * K, x.shape[-1])
        ys[order] = y[expert, rank]
        return torch.bmm(weights.unsqueeze(1), ys.view(N, K, -1)).squeeze(1)

    def ffn(self, xs: torch.Tensor, counts: torch.Tensor, weights=None) -> torch.Tensor:
        """SwiGLU of local expert e over its counts[e] consecutive rows of xs (M, D) -> (M, D).

        `weights` (w1, w2, w3) stand in for the parameters (expert parallelism passes views of them)."""
        return self.ffn_groups(xs, counts.cumsum(0).to(torch.int32), weights)

    def ffn_groups(self, xs: torch.Tensor, ends: torch.Tensor, weights=None) -> torch.Tensor:
        """ffn with each expert's group given by its end row (ends (E,) int32; groups may hold padding rows)."""
        w1, w2, w3 = weights if weights is not None else (self.w1, self.w2, self.w3)
        h = self.act(self.matmul(xs, w1.transpose(1, 2), ends), self.matmul(xs, w3.transpose(1, 2), ends))
        return self.matmul(h, w2.transpose(1, 2), ends)

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """SwiGLU of the two input projections (V4's experts clamp them first)."""
        return F.silu(gate) * up

    def matmul(self, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The grouped GEMM of every projection (a subclass may change its numerics, e.g. to FP8)."""
        return kernels.grouped_mm(x, w, ends)

    def forward_loop(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reference: one expert at a time, as in DeepSeek's inference code. Used by tests only."""
        y = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            xe = x[token]
            he = self.act(xe @ self.w1[e].T, xe @ self.w3[e].T)
            y.index_add_(0, token, (he @ self.w2[e].T) * weights[token, slot, None])
        return y


def _dispatch(indices: torch.Tensor, n_experts: int, multiple: int):
    """Where each (token, slot) goes in the expert-sorted rows, each expert's group padded to `multiple` rows.

    Returns src (M,): the slot n·K+k that each row holds (N·K for a padding row), slot_pos (N·K,): the row of
    each slot, and ends (E,) int32: the end row of each expert's group. With multiple=1, M = N·K, no padding."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # (N·K,) slots grouped by expert id
    counts = torch.bincount(flat, minlength=n_experts)
    sizes = (counts + multiple - 1) // multiple * multiple
    ends = sizes.cumsum(0)
    expert = flat[order]
    rank = torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[expert]
    rows = (ends - sizes)[expert] + rank  # the row of sorted slot j
    src = torch.full((int(ends[-1]),), order.numel(), dtype=order.dtype, device=order.device)
    src[rows] = order
    slot_pos = torch.empty_like(order)
    slot_pos[order] = rows
    return src, slot_pos, ends.to(torch.int32)


class _GatherRows(torch.autograd.Function):
    """out[j] = x[index[j] // fold], where inverse[i] is the one row of out that row i of x·fold went to, or
    len(out) for none (a padding row of x, which then gets zero gradient).

    Its backward is again a gather (plus a sum over the `fold` copies of each row), which is much faster on
    CPU than the scatter-add that autograd would use for plain advanced indexing.
    """

    @staticmethod
    def forward(ctx, x, index, inverse, fold):
        ctx.save_for_backward(inverse)
        ctx.fold = fold
        return x.index_select(0, index // fold if fold > 1 else index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if inverse.numel() and int(inverse.max()) == grad.shape[0]:  # padding rows read a zero row
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[-1])])
        g = grad.index_select(0, inverse)
        if ctx.fold > 1:
            g = g.view(-1, ctx.fold, g.shape[-1]).sum(dim=1)
        return g, None, None, None


class MoE(nn.Module):
    """DeepSeekMoE: routed fine-grained experts plus always-on shared experts (V3 report eq. 12)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, loop: bool = False, router_log: list | None = None) -> torch.Tensor:
        """x: (B, T, D). router_log, when given, receives (scores (N, E) fp32, indices (N, K)) for balancing."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, indices, scores = self.gate(x)
        if router_log is not None:
            router_log.append((scores, indices))
        y = (self.experts.forward_loop if loop else self.experts)(x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


# ----------------------------------------------------------------------------- blocks and model


class Block(nn.Module):
    """Pre-norm Transformer block: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, router_log: list | None = None,
                cache: LayerCache | None = None, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, attn_impl: str | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), freqs_cis, cache, positions, segments, attn_impl)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, router_log=router_log) if isinstance(self.ffn, MoE) else self.ffn(h))


class MTP(nn.Module):
    """One multi-token-prediction module (V3 report §2.2): h' = M[RMSNorm(emb); RMSNorm(h)], then one block.

    The concatenation order [embedding; hidden] is the one DeepSeek's released eh_proj weights use (the paper
    writes it the other way round). Embedding and output head are shared with the main model; `norm` is the
    module's own final norm (`shared_head.norm` in the checkpoint).
    """

    def __init__(self, cfg: ModelConfig, moe: bool, block_cls: type | None = None):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = (block_cls or Block)(cfg, moe)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, freqs_cis: torch.Tensor, router_log: list | None = None,
                cache: LayerCache | None = None, positions: torch.Tensor | None = None,
                attn_impl: str | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.norm(self.block(x, freqs_cis, router_log, cache, positions, attn_impl=attn_impl))


class Transformer(nn.Module):
    """Embedding -> n_layers Blocks -> RMSNorm -> head (untied), plus n_mtp_layers MTP modules.

    `model(tokens)` returns next-token logits (B, T, vocab) for every position. With `return_mtp=True` it also
    returns one logits tensor per MTP depth k, shaped (B, T-k, vocab): position i there predicts token i+k+1.
    """

    block_cls = Block  # the decoder block; sparse.TransformerV32 swaps in its sparse-attention block

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if type(self) is Transformer and cfg.family != "v3":
            raise ValueError(f"a {cfg.family} config builds a later generation: use nanoseek.build_model(cfg)")
        self.cfg = cfg
        has_moe = cfg.n_moe_layers > 0
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.block_cls(cfg, moe=has_moe and i >= cfg.n_dense_layers)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTP(cfg, moe=has_moe, block_cls=self.block_cls) for _ in range(cfg.n_mtp_layers))
        self.register_buffer("rope_bits", rope_bits(rope_table(cfg, cfg.max_seq_len)), persistent=False)
        self.init_weights()

    @property
    def freqs_cis(self) -> torch.Tensor:
        """The RoPE table (max_seq_len, R/2, 2) in fp32, read from its bits (see `rope_bits`)."""
        return self.rope_bits.view(torch.float32)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the RoPE table and zero the routing biases."""
        self.rope_bits = rope_bits(rope_table(self.cfg, self.cfg.max_seq_len)).to(self.rope_bits.device)
        for m in self.modules():
            if isinstance(m, Gate):
                m.bias.zero_()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Every weight ~ N(0, init_std) (V3 report §4.2: 0.006); norms at 1, routing bias and linear biases at 0."""
        std = self.cfg.init_std if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        self.reset_buffers()

    def forward(self, tokens: torch.Tensor, return_mtp: bool = False, router_log: list | None = None, head=None,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        """tokens (B, T) -> logits (B, T, vocab); with return_mtp also [MTP logits (B, T-k, vocab) for k = 1..D].

        `head(h, weight, k)`, when given, replaces the output projection: it receives the final-normed hidden
        states of depth k (0 = the main model, (B, T, D); k >= 1 = MTP depth k, (B, T-k, D)) and the head
        weight (vocab, D), and its results are returned in place of logits. `losses.lm_loss` passes a fused
        head + cross-entropy this way, so the loss never materialises logits yet runs inside this forward
        (where FSDP gathers the head). router_log, when given, receives each MoE layer's (scores, indices),
        main layers then MTP layers. positions/segments: packed samples, as in `hidden` (main model only).
        """
        h = self.hidden(tokens, router_log, positions, segments)  # (B, T, D), after the final norm
        project = (lambda x, k: self.head(x)) if head is None else (lambda x, k: head(x, self.head.weight, k))
        out = project(h, 0)
        if not return_mtp:
            return out
        return out, [project(hk, k) for k, hk in enumerate(self.mtp_hidden(h, tokens, router_log), start=1)]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D), the start of the residual stream, in the table's dtype. Each block adds its
        output to the stream, so it keeps that dtype: fp32 in a mixed-precision model, whose table stays fp32 while
        its norms round to the compute dtype for the blocks' matmuls (runtime.py). A bf16 stream would round away
        updates below 2^-8 of its size, and a bf16 run's trunk stalled for ~60 steps that fp32 did not
        (docs/results/precision-parity.md)."""
        return self.embed(tokens)

    def hidden(self, tokens: torch.Tensor, router_log: list | None = None, positions: torch.Tensor | None = None,
               segments: torch.Tensor | None = None) -> torch.Tensor:
        """The main model's final-normed hidden states (B, T, D).

        For packed samples (SFT), `positions` (B, T) restart RoPE in each sample and `segments` (B, T) keep
        samples from attending to each other (V3's SFT used sample masking)."""
        T = tokens.shape[1]
        if T > self.freqs_cis.shape[0]:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.freqs_cis.shape[0]}")
        freqs_cis = self._freqs_at(positions) if positions is not None else torch.view_as_complex(self.freqs_cis[:T])
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, router_log, segments=segments)
        return self.norm(h)

    def mtp_hidden(self, h: torch.Tensor, tokens: torch.Tensor, router_log: list | None = None) -> list[torch.Tensor]:
        """Hidden states of each MTP depth k, (B, T-k, D): position i there predicts token i+k+1."""
        T, out = tokens.shape[1], []
        for k, mtp in enumerate(self.mtp, start=1):
            # depth k at position i combines h^{k-1}_i with the embedding of token i+k (causal chain kept)
            freqs = torch.view_as_complex(self.freqs_cis[: T - k])
            h = mtp(h[:, :-1], self.embed_tokens(tokens[:, k:]), freqs, router_log)
            out.append(h)
        return out

    # ------------------------------------------------------------------ cached decoding (used by engine.py)

    def _freqs_at(self, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.freqs_cis.shape[0]:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.freqs_cis.shape[0]}")
        return torch.view_as_complex(self.freqs_cis)[positions]  # (B, T, R/2)

    def new_cache(self, batch: int, max_len: int, with_mtp: bool = False) -> KVCache:
        """An empty cache for `batch` rows of up to max_len positions, in the model's dtype and device: per layer
        (and per MTP module with with_mtp) kv_norm(c_KV) and the rotated k_pe, what absorbed MLA reads."""
        cfg, w = self.cfg, self.head.weight  # the compute dtype (the embedding table may stay fp32)
        n = cfg.n_layers + (cfg.n_mtp_layers if with_mtp else 0)
        kv = torch.zeros(n, batch, max_len, cfg.kv_lora_rank, dtype=w.dtype, device=w.device)
        pe = torch.zeros(n, batch, max_len, cfg.qk_rope_head_dim, dtype=w.dtype, device=w.device)
        return KVCache(kv, pe, cfg.n_layers)

    def cache_bytes_per_token(self, max_len: int) -> float:
        """Bytes the decoding cache of one row of max_len positions holds per position (main layers, the model's
        dtype): what serving pays for context. Each generation's cache answers for itself."""
        return self.new_cache(1, max_len).bytes_per_token()

    def hidden_cached(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[LayerCache],
                      attn_impl: str = "absorb") -> torch.Tensor:
        """Final-normed hidden states (B, T, D) of tokens at `positions` (B, T), reading and extending the cache.
        Attention runs in the latent space by default: the cache holds latents, nothing is re-expanded."""
        freqs = self._freqs_at(positions)
        h = self.embed_tokens(tokens)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, freqs, cache=cache, positions=positions, attn_impl=attn_impl)
        return self.norm(h)

    def mtp_cached(self, depth: int, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                   cache: LayerCache, attn_impl: str = "absorb") -> torch.Tensor:
        """MTP depth `depth` (1-based) at `positions`: h_i (the previous depth's hidden) with token i+depth."""
        return self.mtp[depth - 1](h, self.embed_tokens(next_tokens), self._freqs_at(positions), cache=cache,
                                   positions=positions, attn_impl=attn_impl)
