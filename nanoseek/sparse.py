"""DeepSeek-V3.2: DeepSeek Sparse Attention (DSA) on V3's MLA (DeepSeek-V3.2 report, arXiv 2512.02556 §2.1).

A lightning indexer with a few small heads scores every key s for query t (eq. 1):

    I_{t,s} = Σ_j w_{t,j} · ReLU(q^I_{t,j} · k^I_s)

and each query attends — with V3's MLA, unchanged — to its top-k keys only, so long-context attention costs
O(T·k) once the keys are cached. The indexer's queries come from MLA's query latent c^Q_t, its single key from
the block input; its RoPE rotates the first qk_rope_head_dim dims in half-split pairs (x_j, x_{j+R/2}), unlike
MLA's interleaved pairs. Training (§2.1.1) aligns the indexer with the main attention by
KL(p_t ‖ softmax(I_t)), p_t the main attention summed over heads and L1-normalised: first a dense warm-up
(attention stays dense), then sparse training where both sides are restricted to the selected keys; the
indexer's input is detached, so the language-model loss never reaches it and the KL reaches nothing else.

Attention paths (all tested against each other and, through the model, against transformers):
- `naive`: per-head keys/values, SDPA with the causal ∩ top-k mask (the reference);
- `absorb`: latent-space attention (V2 App. C) under the same mask, query blocks against the keys they see;
  with a cache (decoding) it gathers the k selected latents per query instead, reading O(k), not O(S).
Dimension letters as in model.py, plus J indexer heads, I indexer head dim, K selected keys.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .model import MLA, MLP, Block, MoE, RMSNorm, RouterLog, Transformer, apply_rotary_emb


def apply_rotary_half(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE on half-split pairs (x_j, x_{j+R/2}) as complex numbers, in fp32. x: (B, T, H, R)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    xc = torch.complex(x1, x2) * freqs_cis.unsqueeze(-2)  # (B, T, H, R/2)
    return torch.cat([xc.real, xc.imag], dim=-1).to(x.dtype)


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """I_{t,s} = Σ_j w_{t,j} · ReLU(scale · q_{t,j} · k_s) in fp32. q (B, T, J, I), w (B, T, J), k (B, S, I) -> (B, T, S)."""
    B, T, J, _ = q.shape
    s = torch.bmm(q.float().flatten(1, 2), k.float().transpose(1, 2)).view(B, T, J, -1)  # (B, T, J, S)
    return (F.relu(s * scale) * w.unsqueeze(-1)).sum(dim=2)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k largest scores; among equal scores the earlier key wins.

    ReLU makes exactly tied scores common, and torch.topk leaves their order unspecified (it can differ between
    a full forward and a cached decode step, whose score tensors have different shapes; transformers' choice
    among ties is as arbitrary); a stable sort makes the selection a function of the scores alone."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


class Indexer(nn.Module):
    """The lightning indexer: J heads of dim I on the query latent, one shared LayerNorm'd key (V3.2 eq. 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        J, I = cfg.index_n_heads, cfg.index_head_dim
        self.n_heads, self.head_dim, self.rope_dim, self.topk = J, I, cfg.qk_rope_head_dim, cfg.index_topk
        self.scale = I**-0.5
        self.wq_b = nn.Linear(cfg.q_lora_rank, J * I, bias=False)
        self.wk = nn.Linear(cfg.dim, I, bias=False)
        self.k_norm = nn.LayerNorm(I, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.dim, J, bias=False)

    def _rope(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        R = self.rope_dim  # the indexer rotates its *first* R dims
        return torch.cat([apply_rotary_half(x[..., :R], freqs_cis), x[..., R:]], dim=-1)

    def keys(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) -> rotated keys (B, S, I): what the cache keeps next to the MLA latent."""
        return self._rope(self.k_norm(self.wk(x)).unsqueeze(2), freqs_cis).squeeze(2)

    def queries(self, x: torch.Tensor, q_lat: torch.Tensor, freqs_cis: torch.Tensor):
        """x (B, T, D), q_lat (B, T, Q) -> rotated queries (B, T, J, I) and fp32 head weights (B, T, J)."""
        B, T, _ = x.shape
        q = self._rope(self.wq_b(q_lat).view(B, T, self.n_heads, self.head_dim), freqs_cis)
        return q, self.weights_proj(x).float() * self.n_heads**-0.5


class IndexerLog(RouterLog):
    """A RouterLog that also trains V3.2's indexer (§2.1.1).

    dense=True is the warm-up stage (attention stays dense; the KL covers every visible key); otherwise attention
    is sparse and the KL covers the selected keys. Every sparse-attention layer appends its mean KL loss."""

    def __init__(self, dense: bool = False):
        super().__init__()
        self.dense = dense
        self.indexer_losses: list[torch.Tensor] = []


class SparseLayerCache(NamedTuple):
    """One layer's cache: MLA's latent and rope key plus the indexer's key, per position."""

    kv: torch.Tensor  # (B, S_max, C)
    pe: torch.Tensor  # (B, S_max, R)
    index_k: torch.Tensor  # (B, S_max, I)


class SparseKVCache:
    """Caches of every main layer (+ MTP layers with with_mtp) for `batch` rows of up to max_len positions.

    Entries are indexed by absolute position, so a row can be rewound or reused by a new sequence by writing
    from an earlier position (0 for a new one): queries never look past their own position."""

    def __init__(self, model: "TransformerV32", batch: int, max_len: int, with_mtp: bool = False):
        cfg = model.cfg
        n = cfg.n_layers + (cfg.n_mtp_layers if with_mtp else 0)
        like = dict(dtype=model.head.weight.dtype, device=model.head.weight.device)  # compute dtype
        self.kv = torch.zeros(n, batch, max_len, cfg.kv_lora_rank, **like)
        self.pe = torch.zeros(n, batch, max_len, cfg.qk_rope_head_dim, **like)
        self.index_k = torch.zeros(n, batch, max_len, cfg.index_head_dim, **like)
        self.layers = [SparseLayerCache(self.kv[i], self.pe[i], self.index_k[i]) for i in range(n)]
        self.n_main = cfg.n_layers

    @property
    def main(self) -> list[SparseLayerCache]:
        return self.layers[: self.n_main]

    def rows(self, start: int, stop: int) -> "SparseKVCache":
        """Rows start..stop-1, sharing this cache's storage (what the engine's batcher slices)."""
        view = SparseKVCache.__new__(SparseKVCache)
        view.kv, view.pe, view.index_k = (t[:, start:stop] for t in (self.kv, self.pe, self.index_k))
        view.layers = [SparseLayerCache(view.kv[i], view.pe[i], view.index_k[i]) for i in range(view.kv.shape[0])]
        view.n_main = self.n_main
        return view

    def copy_rows(self, dst, src: "SparseKVCache", src_rows) -> None:
        """self[dst] = src[src_rows] for the layers and positions src holds (dst, src_rows: index lists)."""
        n, S = src.kv.shape[0], src.kv.shape[2]
        for mine, theirs in ((self.kv, src.kv), (self.pe, src.pe), (self.index_k, src.index_k)):
            mine[:n, dst, :S] = theirs[:, src_rows]

    @property
    def mtp(self) -> list[SparseLayerCache]:
        return self.layers[self.n_main:]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in the main layers: n_layers × (C + R + I) × dtype size."""
        return self.n_main * (self.kv.shape[-1] + self.pe.shape[-1] + self.index_k.shape[-1]) * self.kv.element_size()


class SparseMLA(MLA):
    """MLA whose queries attend only to the keys the lightning indexer ranks top-k (DSA, V3.2 §2.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.indexer = Indexer(cfg)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: SparseLayerCache | None = None,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                log: RouterLog | None = None, attn_impl: str | None = None) -> torch.Tensor:
        """x (B, T, D). With a cache, new latents and indexer keys are written at `positions` (B, T) and queries
        read every cached position up to their own. `log` (an IndexerLog) selects the warm-up and collects the
        indexer loss; attn_impl overrides the configured attention path."""
        B, T, _ = x.shape
        q_lat = self.q_norm(self.wq_a(x))  # (B, T, Q): c^Q, shared with the indexer
        q = self.wq_b(q_lat).view(B, T, self.n_heads, self.qk_head_dim)  # (B, T, H, P+R)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)  # (B, S, C)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)  # (B, S, 1, R)
        x_i, q_lat_i = x.detach(), q_lat.detach()  # the indexer learns from its KL loss only (§2.1.1)
        k_idx = self.indexer.keys(x_i, freqs_cis)  # (B, S, I)
        if cache is not None:
            rows = torch.arange(B, device=x.device)[:, None]
            cache.kv[rows, positions] = kv.to(cache.kv.dtype)
            cache.pe[rows, positions] = k_pe[:, :, 0].to(cache.pe.dtype)
            cache.index_k[rows, positions] = k_idx.to(cache.index_k.dtype)
            S = int(positions.max()) + 1
            kv, k_pe, k_idx = cache.kv[:, :S], cache.pe[:, :S, None], cache.index_k[:, :S]
        S = kv.shape[1]
        q_pos = positions if positions is not None else torch.arange(S - T, S, device=x.device).expand(B, T)
        visible = torch.arange(S, device=x.device) <= q_pos[..., None]  # (B, T, S) causal
        if segments is not None:  # packed samples never see each other
            visible = visible & (segments[:, :, None] == segments[:, None, :])
        q_idx, w_idx = self.indexer.queries(x_i, q_lat_i, freqs_cis)
        scores = index_scores(q_idx, w_idx, k_idx, self.indexer.scale).masked_fill(~visible, float("-inf"))
        top = topk_indices(scores, min(self.indexer.topk, S))  # (B, T, K)
        dense = isinstance(log, IndexerLog) and log.dense
        selected = visible if dense else visible & torch.zeros_like(visible).scatter_(-1, top, True)
        if isinstance(log, IndexerLog):
            log.indexer_losses.append(self.indexer_loss(q_nope, q_pe, kv, k_pe, scores, selected))
        impl = attn_impl or self.attn_impl
        if impl == "naive":
            o = self.attend_masked(q_nope, q_pe, kv, k_pe, selected)
        elif cache is not None and not dense:
            o = self.attend_gathered(q_nope, q_pe, kv, k_pe, top, visible.gather(-1, top))
        else:
            o = self.attend_latent(q_nope, q_pe, kv, k_pe, selected, q_pos)
        return self.wo(o.flatten(2))  # (B, T, H·V) -> (B, T, D)

    # ------------------------------------------------------------------ attention under a selection

    def _absorb(self, q_nope: torch.Tensor, q_pe: torch.Tensor):
        """Fold W_UK into the queries: (B, T, H, C+R) pre-scaled, and W_UV (H, V, C) for the output."""
        H, P, C = self.n_heads, self.qk_nope_head_dim, self.kv_lora_rank
        wkv_b = self.wkv_b.weight.view(H, P + self.v_head_dim, C)  # (H, P+V, C)
        q_lat = torch.einsum("bthp,hpc->bthc", q_nope, wkv_b[:, :P])  # (B, T, H, C)
        return torch.cat([q_lat, q_pe], dim=-1) * self.softmax_scale, wkv_b[:, P:]

    def attend_masked(self, q_nope, q_pe, kv, k_pe, selected: torch.Tensor) -> torch.Tensor:
        """Reference: per-head keys/values expanded from the latent, SDPA under `selected` (B, T, S). -> (B, T, H, V)."""
        B, S, _ = kv.shape
        H, P, V = self.n_heads, self.qk_nope_head_dim, self.v_head_dim
        k_nope, v = self.wkv_b(kv).view(B, S, H, P + V).split([P, V], dim=-1)  # (B, S, H, P), (B, S, H, V)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, P+R)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], dim=-1)  # (B, S, H, P+R)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=selected.unsqueeze(1), scale=self.softmax_scale)
        return o.transpose(1, 2)  # (B, T, H, V)

    def attend_latent(self, q_nope, q_pe, kv, k_pe, selected: torch.Tensor, q_pos: torch.Tensor,
                      block: int = 128) -> torch.Tensor:
        """Latent-space attention under `selected` (B, T, S), the H heads of a query as rows of one matrix;
        query blocks read only the keys up to their last position. -> (B, T, H, V)"""
        B, T, H, _ = q_nope.shape
        q, w_uv = self._absorb(q_nope, q_pe)
        q = q.flatten(1, 2)  # (B, T·H, C+R), rows (t, h)
        k = torch.cat([kv, k_pe[:, :, 0]], dim=-1)  # (B, S, C+R)
        outs = []
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            seen = int(q_pos[:, t0:t1].max()) + 1
            scores = (q[:, t0 * H:t1 * H] @ k[:, :seen].transpose(1, 2)).view(B, t1 - t0, H, seen)
            scores = scores.masked_fill(~selected[:, t0:t1, None, :seen], float("-inf"))
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype).flatten(1, 2)
            outs.append(probs @ kv[:, :seen])  # (B, t·H, C)
        return torch.einsum("bthc,hvc->bthv", torch.cat(outs, dim=1).view(B, T, H, -1), w_uv)

    def attend_gathered(self, q_nope, q_pe, kv, k_pe, top: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Sparse path: gather each query's K selected latents (top (B, T, K), valid (B, T, K)). -> (B, T, H, V)"""
        B, T, K = top.shape
        q, w_uv = self._absorb(q_nope, q_pe)
        k = torch.cat([kv, k_pe[:, :, 0]], dim=-1)  # (B, S, C+R)
        rows = torch.arange(B, device=kv.device)[:, None, None]
        k_sel, v_sel = k[rows, top], kv[rows, top]  # (B, T, K, C+R), (B, T, K, C)
        scores = torch.einsum("bthc,btkc->bthk", q, k_sel).masked_fill(~valid[:, :, None], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
        return torch.einsum("bthc,hvc->bthv", torch.einsum("bthk,btkc->bthc", probs, v_sel), w_uv)

    def indexer_loss(self, q_nope, q_pe, kv, k_pe, scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """KL(p_t ‖ softmax(I_t)) over the `selected` keys, mean over queries (V3.2 eqs. 3 and 4).

        p_t is the main attention (computed here without gradient) summed over heads and L1-normalised; the
        gradient reaches the indexer only, through `scores` (B, T, S)."""
        with torch.no_grad():
            q, _ = self._absorb(q_nope, q_pe)
            B, T, H, _ = q.shape
            logits = (q.flatten(1, 2) @ torch.cat([kv, k_pe[:, :, 0]], dim=-1).transpose(1, 2)).view(B, T, H, -1)
            p = logits.masked_fill(~selected[:, :, None], float("-inf")).softmax(dim=-1, dtype=torch.float32)
            p = p.mean(dim=2)  # (B, T, S): summed over heads, rows sum to 1
        zero = torch.zeros_like(p)
        log_q = torch.where(selected, scores.masked_fill(~selected, float("-inf")).log_softmax(dim=-1), zero)
        log_p = torch.where(selected, p.clamp_min(1e-30).log(), zero)
        return (p * (log_p - log_q)).sum(dim=-1).mean()


class SparseBlock(Block):
    """V3's pre-norm block with DSA attention; the router log also reaches the attention (the indexer loss)."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        nn.Module.__init__(self)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = SparseMLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x, freqs_cis, router_log=None, cache=None, positions=None, segments=None, attn_impl=None):
        x = x + self.attn(self.attn_norm(x), freqs_cis, cache, positions, segments, router_log, attn_impl)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, router_log=router_log) if isinstance(self.ffn, MoE) else self.ffn(h))


class TransformerV32(Transformer):
    """DeepSeek-V3.2: V3 with DSA in every layer (MTP layers included). `generations.build_model(cfg)` builds it for V3.2 configs."""

    block_cls = SparseBlock

    def new_cache(self, batch: int, max_len: int, with_mtp: bool = False) -> SparseKVCache:
        """A cache for `batch` rows of up to max_len positions (see SparseKVCache; `.main` feeds hidden_cached)."""
        return SparseKVCache(self, batch, max_len, with_mtp)

    def hidden_cached(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[SparseLayerCache],
                      attn_impl: str | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, D) of tokens at `positions` (B, T), reading and extending the caches."""
        freqs = self._freqs_at(positions)
        h = self.embed_tokens(tokens)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, freqs, cache=cache, positions=positions, attn_impl=attn_impl)
        return self.norm(h)
