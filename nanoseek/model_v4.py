"""DeepSeek-V4: hybrid compressed attention, manifold-constrained hyper-connections, hash-routed MoE (V4 report,
arXiv 2606.19348 §2; mHC: arXiv 2512.24880).

What changes from V3 (model.py), in the paper's terms:
- mHC (§2.2): the residual is n_hc parallel streams X (B, T, N, D). Before each attention and each MoE a
  small map of the (RMSNorm'd, flattened) streams gives A (how to collapse them into the sublayer input),
  C (how to spread its output over the streams) and the stream mixer B, projected by Sinkhorn-Knopp onto the
  doubly stochastic matrices: X_{l+1} = Bᵀ X_l + C · F(A X_l). The embedding is copied into every stream; a
  final learned collapse (hc_head) precedes the last RMSNorm.
- Attention (attention_v4.py): sliding-window shared-KV MQA with sinks, plus CSA or HCA memory per layer.
- MoE: every block; sqrtsoftplus scores (√softplus(x)), no expert groups; the first n_hash_layers route each
  token to fixed experts (tid2eid[token], a frozen table), still weighted by the learned scores; SwiGLU
  pre-activations of routed and shared experts are clamped to ±swiglu_limit (the gate from above only).
- MTP (not in transformers, which drops it): h'_i = e_proj(enorm(emb(t_{i+1}))) + h_proj(hnorm(X_i)) per
  stream, one sliding-window block, its own hc_head and norm, the shared head (the checkpoint's e_proj/h_proj).

Shapes: B batch, T tokens, N streams (hc_mult), D model dim, E experts, K active experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention_v4 import AttentionV4, V4Cache
from .config import ModelConfig
from .model import MLP, Experts, Gate, RMSNorm, RouterLog, Transformer, rope_bits, rope_table


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Alternate column and row normalisation of positive (..., N, N) towards a doubly stochastic matrix."""
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """One mHC site: maps the streams to the collapse A (pre), the spread C (post) and the mixer B (comb).

    The coefficients are computed in fp32 (a mixed-precision model keeps these weights fp32 too, as the router's:
    runtime.FP32_MODULES), so Sinkhorn's projection starts from unrounded values."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        N = cfg.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = N, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps
        self.fn = nn.Parameter(torch.empty((N + 2) * N, N * cfg.dim))
        self.base = nn.Parameter(torch.zeros((N + 2) * N))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, N, D) -> sublayer input (B, T, D), post (B, T, N) and comb (B, T, N, N), both fp32."""
        B, T, N, _ = x.shape
        flat = F.rms_norm(x.flatten(2).float(), (x.shape[-1] * N,), eps=self.norm_eps)
        pre, post, comb = F.linear(flat, self.fn.float()).split([N, N, N * N], dim=-1)
        b_pre, b_post, b_comb = self.base.float().split([N, N, N * N])
        s = self.scale.float()
        pre = torch.sigmoid(pre * s[0] + b_pre) + self.eps
        post = 2 * torch.sigmoid(post * s[1] + b_post)
        comb = torch.softmax((comb * s[2] + b_comb).view(B, T, N, N), dim=-1) + self.eps
        comb = sinkhorn(comb, self.iters, self.eps)
        return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype), post, comb

    @staticmethod
    def merge(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X' = Bᵀ X + C ⊗ F: stream n gets Σ_j comb[j, n] · X_j + post_n · out. out (B, T, D) -> (B, T, N, D)."""
        return post.to(x.dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(x.dtype).transpose(-1, -2), x)


class HyperHead(nn.Module):
    """The final collapse of the streams: Σ_n (sigmoid(a_n) + eps) · X_n, a from the RMSNorm'd streams (in fp32,
    as HyperConnection's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps, self.norm_eps = cfg.hc_eps, cfg.norm_eps
        self.fn = nn.Parameter(torch.empty(cfg.hc_mult, cfg.hc_mult * cfg.dim))
        self.base = nn.Parameter(torch.zeros(cfg.hc_mult))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, D) -> (B, T, D)."""
        flat = F.rms_norm(x.flatten(2).float(), (x.shape[-2] * x.shape[-1],), eps=self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.fn.float()) * self.scale.float() + self.base.float()) + self.eps
        return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


# ----------------------------------------------------------------------------- MoE


def route_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()  # V4: grows like √x, never saturates (unlike sigmoid)
    return logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)


class GateV4(Gate):
    """V4's router: scores (sqrtsoftplus), top-k of score + bias (no groups), weights renormalised and scaled."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> combine weights (N, K), expert ids (N, K), fp32 scores (N, E)."""
        scores = route_scores(F.linear(x.float(), self.weight.float()), self.score_func)
        indices = (scores + self.bias).topk(self.topk, dim=-1)[1]
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.route_scale).to(x.dtype), indices, scores


class HashGate(nn.Module):
    """Hash routing (V4 §2.1): token t always goes to experts tid2eid[t]; the learned scores only weight them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.score_func, self.route_scale, self.topk = cfg.score_func, cfg.route_scale, cfg.n_activated_experts
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.n_activated_experts, dtype=torch.long))

    @torch.no_grad()
    def reset_table(self, seed: int = 0) -> None:
        """A fixed pseudo-random table: each token gets K distinct experts, uniformly (checkpoints ship theirs)."""
        if self.tid2eid.is_meta:
            return
        g = torch.Generator().manual_seed(seed)
        E = self.weight.shape[0]
        table = torch.rand(self.tid2eid.shape[0], E, generator=g).argsort(dim=-1)[:, : self.topk]
        self.tid2eid.copy_(table)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D), tokens (N,) -> combine weights (N, K), expert ids (N, K), fp32 scores (N, E)."""
        scores = route_scores(F.linear(x.float(), self.weight.float()), self.score_func)
        indices = self.tid2eid[tokens]
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.route_scale).to(x.dtype), indices, scores


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, L)) · clamp(up, -L, L): V4 bounds the SwiGLU inputs for low-precision stability."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class ClampedExperts(Experts):
    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float):
        super().__init__(n_experts, dim, inter_dim)
        self.limit = limit

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(gate, up, self.limit)


class ClampedMLP(MLP):
    def __init__(self, dim: int, inter_dim: int, limit: float):
        super().__init__(dim, inter_dim)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))


class MoEV4(nn.Module):
    """Routed experts (learned or hash routing) plus one shared expert, both with clamped SwiGLU."""

    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.gate = HashGate(cfg) if hashed else GateV4(cfg)
        self.experts = ClampedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit)
        self.shared_experts = ClampedMLP(cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, router_log: RouterLog | None = None,
                loop: bool = False) -> torch.Tensor:
        """x (B, T, D), tokens (B, T). Learned-routing layers log (scores, indices) for balancing; hash layers
        have nothing to balance."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        if isinstance(self.gate, HashGate):
            weights, indices, _ = self.gate(x, tokens.reshape(-1))
        else:
            weights, indices, scores = self.gate(x)
            if router_log is not None:
                router_log.append((scores, indices))
        y = (self.experts.forward_loop if loop else self.experts)(x, weights, indices)
        return (y + self.shared_experts(x)).view(shape)


# ----------------------------------------------------------------------------- blocks and model


class BlockV4(nn.Module):
    """attention and MoE sublayers, each entered and left through an mHC site (pre-norm inside)."""

    def __init__(self, cfg: ModelConfig, kind: str, hashed: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = AttentionV4(cfg, kind)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoEV4(cfg, hashed)
        self.hc_attn = HyperConnection(cfg)
        self.hc_ffn = HyperConnection(cfg)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, table: torch.Tensor, router_log=None, cache=None,
                positions: torch.Tensor | None = None, attn_impl: str | None = None) -> torch.Tensor:
        """x (B, T, N, D) streams; table: the complex RoPE table of this layer's kind."""
        h, post, comb = self.hc_attn(x)
        x = HyperConnection.merge(x, self.attn(self.attn_norm(h), table, cache, positions, attn_impl), post, comb)
        h, post, comb = self.hc_ffn(x)
        return HyperConnection.merge(x, self.ffn(self.ffn_norm(h), tokens, router_log), post, comb)


class MTPV4(BlockV4):
    """A V4 multi-token-prediction module: a sliding-window block fed e_proj(emb) + h_proj(streams)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, "sliding", hashed=False)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.e_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.h_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hc_head = HyperHead(cfg)

    def forward(self, x, emb, tokens, table, router_log=None, cache=None, positions=None, attn_impl=None):
        """x (B, T, N, D) the previous depth's streams, emb (B, T, D) the embeddings of the tokens k ahead ->
        (streams (B, T, N, D), final-normed hidden (B, T, D))."""
        # the new streams in the embedding rows' dtype: fp32 under mixed precision (TransformerV4.embedding)
        x = self.e_proj(self.enorm(emb)).to(emb.dtype).unsqueeze(2) + self.h_proj(self.hnorm(x))
        x = super().forward(x, tokens, table, router_log, cache, positions, attn_impl)
        return x, self.norm(self.hc_head(x))


class TransformerV4(Transformer):
    """DeepSeek-V4: embedding -> N copies -> V4 blocks -> hc_head -> RMSNorm -> head, plus V4 MTP modules.

    `Transformer(cfg)` builds this class for V4 configs; forward/hidden/lm_loss/engine contracts are V3's."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(BlockV4(cfg, cfg.layer_kind(i), hashed=i < cfg.n_hash_layers)
                                    for i in range(cfg.n_layers))
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPV4(cfg) for _ in range(cfg.n_mtp_layers))
        main, compress = self._rope_tables()
        self.register_buffer("rope_bits_main", rope_bits(main), persistent=False)  # fp32 bits, as V3's rope_bits
        self.register_buffer("rope_bits_compress", rope_bits(compress), persistent=False)
        self.init_weights()

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sliding-window layers: plain RoPE at rope_theta; compressed layers: compress_rope_theta with YaRN."""
        cfg = self.cfg
        return (rope_table(cfg.replace(rope_factor=1.0), cfg.max_seq_len),
                rope_table(cfg.replace(rope_theta=cfg.compress_rope_theta), cfg.max_seq_len))

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the RoPE tables, zero the routing biases and redraw the hash tables."""
        device = self.rope_bits_main.device
        main, compress = self._rope_tables()
        self.rope_bits_main, self.rope_bits_compress = rope_bits(main).to(device), rope_bits(compress).to(device)
        for m in self.modules():
            if isinstance(m, Gate):
                m.bias.zero_()
        for i, m in enumerate(m for m in self.modules() if isinstance(m, HashGate)):
            m.reset_table(seed=i)  # each hash layer its own table

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Weights ~ N(0, std); norms and mHC scales at 1; sinks, slot biases (ape) and mHC biases at 0."""
        if self.embed.weight.is_meta:  # built to be filled (load_hf): nothing to initialise
            return
        std = self.cfg.init_std if std is None else std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight") or (leaf == "scale" and "hc_" in name):
                p.fill_(1.0)
            elif leaf in ("attn_sink", "ape") or (leaf == "base" and "hc_" in name):
                p.zero_()
            else:
                p.normal_(0.0, std)
        self.reset_buffers()

    def table(self, kind: str) -> torch.Tensor:
        """The complex RoPE table (max_seq_len, R/2) of a layer kind."""
        bits = self.rope_bits_main if kind == "sliding" else self.rope_bits_compress
        return torch.view_as_complex(bits.view(torch.float32))

    # ------------------------------------------------------------------ full sequences

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rows that start the streams, in the table's dtype (Transformer.embed_tokens): in a mixed-precision
        model fp32, so the streams are fp32 sums of the blocks' bf16 outputs, as V3's residual stream."""
        return self.embed_tokens(tokens)

    def streams(self, tokens: torch.Tensor, router_log=None, attn_impl: str | None = None) -> torch.Tensor:
        """The residual streams after the last block, (B, T, N, D)."""
        if tokens.shape[1] > self.rope_bits_main.shape[0]:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.rope_bits_main.shape[0]}")
        x = self.embedding(tokens).unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1)
        for layer in self.layers:
            x = layer(x, tokens, self.table(layer.attn.kind), router_log, attn_impl=attn_impl)
        return x

    def hidden(self, tokens: torch.Tensor, router_log=None, positions=None, segments=None) -> torch.Tensor:
        """The main model's final-normed hidden states (B, T, D)."""
        if positions is not None or segments is not None:
            raise ValueError("V4 attention compresses across the whole row: packed samples (positions/segments) "
                             "are not supported; train V4 on unpacked rows")
        return self.norm(self.hc_head(self.streams(tokens, router_log)))

    def forward(self, tokens: torch.Tensor, return_mtp: bool = False, router_log=None, head=None):
        """As Transformer.forward: logits (B, T, vocab), with return_mtp also [MTP logits (B, T-k, vocab)]."""
        project = (lambda h, k: self.head(h)) if head is None else (lambda h, k: head(h, self.head.weight, k))
        x = self.streams(tokens, router_log)
        out = project(self.norm(self.hc_head(x)), 0)
        if not return_mtp:
            return out
        mtp, table = [], self.table("sliding")
        for k, module in enumerate(self.mtp, start=1):
            x, h = module(x[:, :-1], self.embedding(tokens[:, k:]), tokens[:, k:], table, router_log)
            mtp.append(project(h, k))
        return out, mtp

    def mtp_hidden(self, h, tokens, router_log=None):
        raise ValueError("V4's MTP modules read the residual streams, not the final hidden states: "
                         "use forward(tokens, return_mtp=True)")

    # ------------------------------------------------------------------ cached decoding

    def new_cache(self, batch: int, max_len: int, with_mtp: bool = False, rewind: int = 16) -> V4Cache:
        """Per-layer sliding-window rings and compressed memories for `batch` rows of up to max_len positions;
        a row may step back at most `rewind` positions (see V4LayerCache)."""
        return V4Cache(self, batch, max_len, with_mtp, rewind)

    def cache_bytes_per_token(self, max_len: int) -> float:
        """Bytes per position of one row's cache of max_len positions, without rewind slack: the sliding window
        and the compressed memories do not grow by one entry per token, so this is the cache over its length."""
        return self.new_cache(1, max_len, rewind=0).nbytes() / max_len

    def streams_cached(self, tokens, positions, caches, attn_impl=None) -> torch.Tensor:
        """Residual streams (B, T, N, D) of tokens at `positions` (B, T), reading and extending the caches."""
        if int(positions.max()) >= self.rope_bits_main.shape[0]:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.rope_bits_main.shape[0]}")
        x = self.embedding(tokens).unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, tokens, self.table(layer.attn.kind), cache=cache, positions=positions, attn_impl=attn_impl)
        return x

    def hidden_cached(self, tokens, positions, caches, attn_impl=None) -> torch.Tensor:
        """Final-normed hidden states (B, T, D) of tokens at `positions` (B, T), reading and extending the caches."""
        return self.norm(self.hc_head(self.streams_cached(tokens, positions, caches, attn_impl)))

    def mtp_cached(self, depth: int, x: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor, cache):
        """MTP depth `depth` at `positions`: x the previous depth's streams (B, T, N, D) (streams_cached for
        depth 1), next_tokens the tokens `depth` ahead. Returns (streams, final-normed hidden (B, T, D))."""
        return self.mtp[depth - 1](x, self.embedding(next_tokens), next_tokens, self.table("sliding"),
                                   cache=cache, positions=positions)
