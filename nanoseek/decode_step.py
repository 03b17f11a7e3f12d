"""A decode step of the V3 model in few operations: what `Transformer.hidden_cached` computes for a few new tokens
per row (one when decoding, two when speculative decoding verifies a draft), with the weights folded for decoding.

A decode step of the speedrun's models is hundreds of tiny operations, and on a CPU each costs more in dispatch
than in arithmetic (docs/results/decode.md: ~8 ms per token at batch 1, most of it per-op overhead). This step
computes the same function with fewer of them:

- MLA in the latent space with W_UK folded into the query projection and W_UV into the output projection (the
  absorption of the V2 report, App. C, taken one step further: the weight products are computed once per
  generation, not per token), the softmax scale folded into the query weights, and the two down-projections that read
  the normed input (W_DQ and W_DKV) as one matmul. Folding pays while the latent is no wider than the heads'
  nope and value dims, or not much wider (`fold_growth`: the presets here 0.7-1.34); at DeepSeek's sizes (512
  against 128) the folded matrices would be ~3× larger than the ones they replace, so such models keep
  `hidden_cached`;
- the routed experts of a single row (or of each of two: a draft's verification) read in place (views of the
  stacked weights, no sorting or grouping), the shared expert joining them as one more expert of weight 1 when it
  has their width; more rows are grouped by expert and padded to the mean group size for batched matmuls, the
  rows a crowded expert has beyond it going through its own weights (the model's own experts when there are
  more experts than slots);
- SwiGLU's two input projections as one matmul, residual additions fused into the output matmuls.

The gates run as modules (their forward hooks see every call: routing.RoutingCapture records them), with the same
operations as `Gate.forward`, so for equal inputs the experts chosen are the model's. The folded weights are taken
when a generation starts (`refresh`, which the engine calls), so every GRPO or distillation rollout sees the weights
of its step. Results equal `hidden_cached`'s up to rounding (the products are associated differently); tests compare
them. `DecodeStep.supports` says which models it serves: the plain V3 `Transformer` with nn.Linear projections
(V3.2, V4, FP8 experts and expert parallelism keep `hidden_cached`).

With compile=True the step runs through torch.compile in a formulation without data-dependent shapes or host syncs
(every cached key with a mask, the experts' weights gathered for a few rows or all experts computed for more, RoPE
in real arithmetic); `traced=True` runs that formulation eagerly, which is how the tests check it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .model import MLA, MLP, Experts, LayerCache, MoE, Transformer, apply_rotary_emb

GATHER_SLOTS = 8  # traced steps gather the chosen experts' weights up to this many (row, expert) slots
FEW_ROWS = 2  # eager steps of up to this many rows read each row's experts in place (more: the batched experts)
MAX_FOLD_GROWTH = 1.5  # fold while the folded attention weights are at most this × those they replace


def fold_growth(cfg) -> float:
    """Parameters of the folded query and output projections over those of the matrices they replace (W_UQ with
    W_UK, W_O with W_UV). The presets here: 0.7-1.34; DeepSeek-V3's sizes (latent 512, heads 128 + 64): 3.4."""
    H, C, R, P, V, D = (cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim,
                        cfg.dim)
    q_in = cfg.q_lora_rank or D
    folded = H * (C + R) * q_in + D * H * C
    replaced = H * (P + R) * q_in + H * P * C + D * H * V + H * V * C
    return folded / replaced


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """RMSNorm in fp32, rounded once to the norm's output dtype (as model.RMSNorm). In an fp32 model the casts are
    left out: each is a dispatch of a few µs, and a step has 17 norms."""
    w = norm.weight
    if x.dtype == w.dtype == torch.float32 and norm.out_dtype in (None, torch.float32):
        return F.rms_norm(x, (x.shape[-1],), w, norm.eps)
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), norm.eps).to(norm.out_dtype or x.dtype)


class _Attention:
    """The folded weights of one MLA layer."""

    def __init__(self, attn: MLA, norm: nn.Module):
        H, C, R, P = attn.n_heads, attn.kv_lora_rank, attn.qk_rope_head_dim, attn.qk_nope_head_dim
        self.H, self.C, self.R, self.norm, self.attn = H, C, R, norm, attn
        down = [attn.wkv_a] if not hasattr(attn, "wq_a") else [attn.wq_a, attn.wkv_a]
        self.w_down = torch.cat([m.weight for m in down])  # (Q + C + R, D); Q = 0 without a query LoRA
        self.b_down = None if down[0].bias is None else torch.cat([m.bias for m in down])
        self.q_rank = attn.wq_a.weight.shape[0] if hasattr(attn, "wq_a") else 0
        w_q = (attn.wq_b if hasattr(attn, "wq_b") else attn.wq).weight.float()
        w_q = w_q.view(H, P + R, -1)  # (H, P+R, in)
        wkv_b = attn.wkv_b.weight.float().view(H, P + attn.v_head_dim, C)
        w_uk, w_uv = wkv_b[:, :P], wkv_b[:, P:]  # (H, P, C), (H, V, C)
        q_lat = torch.einsum("hpc,hpi->hci", w_uk, w_q[:, :P])  # (H, C, in): q_nope·W_UK as one projection
        w_qa = torch.cat([q_lat, w_q[:, P:]], dim=1) * attn.softmax_scale  # (H, C+R, in)
        self.w_q = w_qa.reshape(H * (C + R), -1).to(attn.wkv_a.weight.dtype)
        wo = attn.wo.weight.float().view(-1, H, attn.v_head_dim)  # (D, H, V)
        self.w_o = torch.einsum("dhv,hvc->dhc", wo, w_uv).reshape(wo.shape[0], H * C).to(attn.wo.weight.dtype)
        self.b_o = attn.wo.bias

    def __call__(self, x, cs, cache, rows, positions, bias, S, traced=False):
        """x (N, D) residual stream of N = B·T tokens (T consecutive per row) -> x + attention output (N, D); writes
        the new latents into `cache` at positions (B, T). cs (N, R/2, 2): each token's RoPE (cos, sin); bias
        (B, T·H or 1, S): 0 where a query sees a key, -inf elsewhere. rows: arange(B)."""
        N, H, C, R = x.shape[0], self.H, self.C, self.R
        B, T = positions.shape
        xn = _rms(x, self.norm)
        a = F.linear(xn, self.w_down, self.b_down)  # (N, Q + C + R)
        if self.q_rank:
            cq, kv, k_pe = a.split([self.q_rank, C, R], dim=-1)
            cq = _rms(cq, self.attn.q_norm)
        else:  # the query projection reads the normed input itself
            cq, (kv, k_pe) = xn, a.split([C, R], dim=-1)
        q = F.linear(cq, self.w_q).view(N, H, C + R)
        q_lat, q_pe = q.split([C, R], dim=-1)
        pe_all = _rotate(torch.cat([q_pe, k_pe.view(N, 1, R)], dim=1), cs, traced)  # (N, H+1, R): one rotation
        q_pe, k_pe = pe_all[:, :H], pe_all[:, H:]
        cache.kv[rows[:, None], positions] = _rms(kv, self.attn.kv_norm).to(cache.kv.dtype).view(B, T, C)
        cache.pe[rows[:, None], positions] = k_pe.to(cache.pe.dtype).view(B, T, R)
        keys, pe = cache.kv[:, :S], cache.pe[:, :S]  # (B, S, C), (B, S, R)
        q_lat, q_pe = q_lat.reshape(B, T * H, C), q_pe.reshape(B, T * H, R)  # rows (t, h) of each sequence
        scores = torch.baddbmm(bias, q_lat, keys.transpose(1, 2))  # (B, T·H, S)
        scores = scores.baddbmm_(q_pe, pe.transpose(1, 2))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(keys.dtype)
        o = torch.bmm(probs, keys).view(N, H * C)  # the latent output of every head
        out = F.linear(o, self.w_o, self.b_o)
        return x + out.to(x.dtype)


def _rotate(x: torch.Tensor, cs: torch.Tensor, traced: bool) -> torch.Tensor:
    """RoPE of x (N, H, R) with cs (N, R/2, 2), in fp32. Eager: model.apply_rotary_emb (complex multiply, fewest
    operations); traced: the same rotation in real arithmetic, which the compiler fuses (it has no complex kernels)."""
    if not traced:
        return apply_rotary_emb(x.unsqueeze(1), torch.view_as_complex(cs).unsqueeze(1)).squeeze(1)
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, R/2) each
    c, s = cs.unsqueeze(1).unbind(-1)
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


class _FFN:
    """The folded weights of one dense SwiGLU or DeepSeekMoE layer."""

    def __init__(self, ffn: nn.Module, norm: nn.Module):
        self.norm, self.moe = norm, isinstance(ffn, MoE)
        if not self.moe:
            self.w13, self.w2 = torch.cat([ffn.w1.weight, ffn.w3.weight]), ffn.w2.weight
            return
        self.gate, self.experts, E = ffn.gate, ffn.experts, ffn.experts.w1.shape[0]
        self.n_experts, shared = E, ffn.shared_experts
        w13 = torch.cat([ffn.experts.w1, ffn.experts.w3], dim=1)  # (E, 2F, D)
        w2 = ffn.experts.w2  # (E, D, F)
        # The shared expert joins the gathered experts as expert E (weight 1) when it has their width
        self.shared_in = shared is not None and shared.w1.weight.shape[0] == w13.shape[1] // 2
        if self.shared_in:
            w13 = torch.cat([w13, torch.cat([shared.w1.weight, shared.w3.weight])[None]])
            w2 = torch.cat([w2, shared.w2.weight[None]])
        self.shared = None if self.shared_in else shared
        self.shared_mlp = shared  # the many-rows path runs it as the model does
        self.w13, self.w2 = w13.detach(), w2.detach()
        self.w13_e, self.w2_e = self.w13.unbind(0), self.w2.unbind(0)  # each expert's views, made once

    def __call__(self, x: torch.Tensor, traced: bool = False) -> torch.Tensor:
        """x (N, D) residual stream -> x + FFN output (N, D). `traced`: under torch.compile (no host syncs, no
        data-dependent shapes)."""
        h = _rms(x, self.norm)
        if not self.moe:
            g, u = F.linear(h, self.w13).chunk(2, dim=-1)
            return _add_linear(x, F.silu(g, inplace=True).mul_(u), self.w2)
        weights, indices, _ = self.gate(h)  # a module call: routing hooks see it
        B, K = indices.shape
        if not traced and B > FEW_ROWS:
            return self._padded(x, h, weights, indices)
        if self.shared_in:  # one more slot per row: expert E with weight 1
            indices = torch.cat([indices, indices.new_full((B, 1), self.n_experts)], dim=1)
            weights = torch.cat([weights, weights.new_ones(B, 1)], dim=1)
        if traced:
            out = self._gathered(h, weights, indices) if B * indices.shape[1] <= GATHER_SLOTS else \
                self._dense(h, weights, indices)
        else:  # decoding one row, or verifying a draft: each row's experts read in place
            return torch.cat([self._one_row(x[r:r + 1], h[r:r + 1], weights[r:r + 1], indices[r:r + 1])
                              for r in range(B)]) if B > 1 else self._one_row(x, h, weights, indices)
        if self.shared is not None:
            out = out + self.shared(h)
        return x + out.to(x.dtype)

    def _one_row(self, x, h, weights, indices):
        """One row: each chosen expert's weights read in place (views), its output added into the stream."""
        for e, w in zip(indices[0].tolist(), weights[0].tolist()):
            g, u = F.linear(h, self.w13_e[e]).chunk(2, dim=-1)
            x = _add_linear(x, F.silu(g, inplace=True).mul_(u), self.w2_e[e], w)  # g, u: views of a fresh tensor
        if self.shared is not None:
            x = x + self.shared(h).to(x.dtype)
        return x

    def _padded(self, x, h, weights, indices):
        """More rows, eager: the routed slots grouped by expert, every group padded to C rows (the mean group size
        rounded up to a multiple of 8) for one batched matmul per projection (W1 and W3 as one); the rows a crowded
        expert has beyond C run through its own weights. A trained router is unbalanced: in a batch-32 decode step
        one expert takes 12-16 of 64 slots, and padding every group to the largest (4× the slots) costs as much
        as one GEMM call per expert at 1 thread (docs/results/decode.md). The weighted sum is added into the
        stream; the shared expert runs as a dense SwiGLU. With more experts than slots (padding > 8×) the model's
        own experts run instead."""
        N, K = indices.shape
        E, D = self.n_experts, h.shape[-1]
        mean = -(-(N * K) // E)  # slots per expert, rounded up
        C = -(-mean // 8) * 8  # a multiple of 8: MKL's batched GEMM is faster there
        if E * C > 8 * N * K:
            out = self.experts(h, weights, indices)
            return x + (out if self.shared_mlp is None else out + self.shared_mlp(h)).to(x.dtype)
        flat = indices.flatten()
        counts = torch.bincount(flat, minlength=E)
        order = flat.argsort(stable=True)  # slots grouped by expert id
        expert = flat[order]
        rank = torch.arange(N * K, device=h.device) - (counts.cumsum(0) - counts)[expert]  # row in its group
        fits = rank < C
        e_in, r_in, slots_in = expert[fits], rank[fits], order[fits]
        xs = h.new_zeros(E, C, D)
        xs[e_in, r_in] = h[slots_in // K]
        g, u = torch.bmm(xs, self.w13[:E].transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(g, inplace=True).mul_(u), self.w2[:E].transpose(1, 2))  # (E, C, D)
        ys = h.new_empty(N * K, D)
        ys[slots_in] = y[e_in, r_in]  # back to (row, k) order
        start = 0
        for e, n in enumerate(counts.tolist()):  # the crowded experts' rows beyond C
            if n > C:
                slots = order[start + C:start + n]
                g, u = F.linear(h[slots // K], self.w13_e[e]).chunk(2, dim=-1)
                ys[slots] = F.linear(F.silu(g, inplace=True).mul_(u), self.w2_e[e])
            start += n
        if x.dtype == ys.dtype:
            x = torch.baddbmm(x.unsqueeze(1), weights.unsqueeze(1), ys.view(N, K, D)).squeeze(1)
        else:
            x = x + torch.bmm(weights.unsqueeze(1), ys.view(N, K, D)).squeeze(1).to(x.dtype)
        if self.shared_in:
            g, u = F.linear(h, self.w13_e[E]).chunk(2, dim=-1)
            return _add_linear(x, F.silu(g, inplace=True).mul_(u), self.w2_e[E])
        return x if self.shared is None else x + self.shared(h).to(x.dtype)

    def _gathered(self, h, weights, indices):
        """Few rows, traced: the chosen experts' weights gathered, then batched matmuls (B, D)."""
        B, K = indices.shape
        flat = indices.flatten()
        hk = h.unsqueeze(1).expand(B, K, h.shape[-1]).reshape(B * K, 1, -1)  # (B·K, 1, D)
        g, u = torch.bmm(hk, self.w13[flat].transpose(1, 2)).chunk(2, dim=-1)  # (B·K, 1, F) each
        y = torch.bmm(F.silu(g) * u, self.w2[flat].transpose(1, 2))  # (B·K, 1, D)
        return torch.bmm(weights.unsqueeze(1), y.view(B, K, -1)).squeeze(1)  # (B, D)

    def _dense(self, h, weights, indices):
        """Many rows, traced: every expert on every row, unchosen ones with weight 0 (static shapes; the FLOPs of
        all experts, fine at decode's few rows)."""
        E2, F2, D = self.w13.shape
        dense = weights.new_zeros(h.shape[0], E2).scatter_(1, indices, weights)  # (B, E')
        g, u = F.linear(h, self.w13.reshape(E2 * F2, D)).view(-1, E2, F2).chunk(2, dim=-1)  # (B, E', F)
        a = (F.silu(g) * u * dense.unsqueeze(-1)).flatten(1)  # (B, E'·F)
        return F.linear(a, self.w2.transpose(1, 2).reshape(E2 * (F2 // 2), D).t())


def _add_linear(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """x + alpha · a @ wᵀ, as one addmm when x and a share a dtype (the residual stream may be wider)."""
    if x.dtype == a.dtype and x.dim() == 2:
        return torch.addmm(x, a, w.t(), alpha=alpha)
    return x + (alpha * F.linear(a, w)).to(x.dtype)


class DecodeStep:
    """`step(tokens (B, T), positions (B, T), caches)` -> final-normed hidden states (B, T, D), as
    `model.hidden_cached` for a few new tokens per row (1 when decoding, 2 when speculative decoding verifies a
    draft); `step.mtp_cached(...)` as `model.mtp_cached`. Build with `DecodeStep.build(model)`, which returns None
    for a model it does not serve."""

    def __init__(self, model: Transformer, compile: bool = False, traced: bool | None = None):
        """compile: through torch.compile, which needs the traced formulation (static shapes, no host syncs:
        every key, experts gathered or all computed). traced without compile runs that formulation eagerly (its
        test)."""
        self.model, self.layers, self.mtp = model, [], []
        self.traced = compile if traced is None else traced
        # dynamic: one graph serves every batch size (a graph per shape would recompile at each new one)
        self._run = torch.compile(self._layers, dynamic=True) if compile else self._layers

    @staticmethod
    def supports(model: nn.Module) -> bool:
        if type(model) is not Transformer:
            return False
        if fold_growth(model.cfg) > MAX_FOLD_GROWTH:
            return False
        for layer in [*model.layers, *(m.block for m in model.mtp)]:
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            if any(type(m) is not nn.Linear for m in linears):
                return False
            experts = [m for m in layer.modules() if isinstance(m, Experts)]
            if any(type(e).matmul is not Experts.matmul or e.dispatch is not None for e in experts):
                return False
            if not isinstance(layer.ffn, (MoE, MLP)):
                return False
        return True

    @classmethod
    def build(cls, model: nn.Module, compile: bool = False) -> "DecodeStep | None":
        return cls(model, compile) if cls.supports(model) else None

    @torch.inference_mode()
    def refresh(self) -> None:
        """Fold the model's current weights. The engine calls it when a generation starts (Engine.generate, a new
        Batcher): weights change between generations (GRPO's and distillation's updates), never during one. Version
        counters cannot tell instead: torch's fused AdamW updates parameters without bumping them."""
        fold = lambda b: (_Attention(b.attn, b.attn_norm), _FFN(b.ffn, b.ffn_norm))  # noqa: E731
        self.layers = [fold(layer) for layer in self.model.layers]
        self.mtp = [fold(m.block) for m in self.model.mtp]

    def _inputs(self, positions: torch.Tensor, caches) -> tuple:
        """RoPE (N, R/2, 2), the key count S and the attention bias (B, T·H or 1, S) of one call."""
        if not self.layers:
            self.refresh()
        self.model._freqs_at(positions)  # raises past max_seq_len
        B, T = positions.shape
        S = caches[0].kv.shape[1]  # compiled: every key, one shape (a graph per key count would recompile)
        if not self.traced:
            S = kernels.key_count(int(positions.max()) + 1, S)
        visible = torch.arange(S, device=positions.device) <= positions[..., None]  # (B, T, S)
        bias = torch.zeros(B, T, S, dtype=caches[0].kv.dtype, device=positions.device)
        bias.masked_fill_(~visible, float("-inf"))
        if T > 1:  # one row per (token, head)
            bias = bias.repeat_interleave(self.model.cfg.n_heads, dim=1)
        return self.model.freqs_cis[positions.flatten()], S, bias

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, caches) -> torch.Tensor:
        cs, S, bias = self._inputs(positions, caches)
        x = self.model.embed_tokens(tokens.flatten())  # (N, D): the residual stream
        h = self._run(x, cs, [c.kv for c in caches], [c.pe for c in caches], positions, bias, S)
        return h.view(*tokens.shape, -1)

    @torch.inference_mode()
    def mtp_cached(self, depth: int, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                   cache) -> torch.Tensor:
        """MTP depth `depth` (1-based) at positions (B, T), as model.mtp_cached."""
        cs, S, bias = self._inputs(positions, [cache])
        module, (attn, ffn) = self.model.mtp[depth - 1], self.mtp[depth - 1]
        emb = self.model.embed_tokens(next_tokens.flatten())
        x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h.flatten(0, 1))], dim=-1))
        rows = torch.arange(positions.shape[0], device=positions.device)
        x = ffn(attn(x, cs, cache, rows, positions, bias, S, self.traced), self.traced)
        return module.norm(x).view(*next_tokens.shape, -1)

    def _layers(self, x, cs, kvs, pes, positions, bias, S):
        rows = torch.arange(positions.shape[0], device=x.device)
        for (attn, ffn), kv, pe in zip(self.layers, kvs, pes):
            x = ffn(attn(x, cs, LayerCache(kv, pe), rows, positions, bias, S, self.traced), self.traced)
        return self.model.norm(x)
