"""Parameters, KV cache, training FLOPs and GPU cost from a config (V3 report arXiv 2412.19437: sizes §4.2, GPU-hours Table 1; KV cache per token as in DeepSeek-V2 arXiv 2405.04434 Table 1).

Conventions (stated wherever numbers are printed):
- `active_params` counts what one token touches, *without* the embedding lookup (a gather, no FLOPs) but
  *with* the output head: V3 gives 36.6B, DeepSeek's "37B".
- `total_params` excludes the MTP modules (DeepSeek's 671B); `mtp_params` counts what the MTP modules add
  (their embedding and head are shared with the main model).
- `train_flops_per_token` = 6 × active_params + causal attention: per layer 6 × (S/2) × H × (d_qk + d_v), i.e.
  forward + backward (×3) of QKᵀ and PV over the lower triangle only. V3 at 4K: 250.5 GFLOP (ISCA'25: 250).
- KV cache bytes are bf16 (2 bytes per element): the absorbed MLA cache stores (kv_lora_rank +
  qk_rope_head_dim) values per token per layer (+ index_head_dim for V3.2's indexer keys); the naive one
  per-head K and V. V4's cache depends on the context S: per layer min(S, window) raw entries plus S/m
  compressed ones (+ their indexer keys in CSA layers), reported per token of an S-token context; its
  "naive" figure keeps every token's raw entry instead.
- V3.2 and V4 attention FLOPs count what the sparse/compressed attention reads: V3.2's indexer scores all S
  keys and MLA reads min(S, index_topk); V4 reads its window plus the compressed entries (top-k in CSA).
  `inference_flops_per_token` is the cost of decoding one token after S: 2 × active + attention.

How each generation is counted is one `Counting` record in `COUNTING`, keyed by `ModelConfig.family` like
config.FAMILIES: a new attention variant adds its entry there instead of a branch in every public function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ModelConfig, family_entry

BYTES_BF16 = 2


# ----------------------------------------------------------------------------- MoE / MLA models


def indexer_params(cfg: ModelConfig) -> int:
    """V3.2's lightning indexer: wq_b, wk, k_norm (LayerNorm: weight and bias), weights_proj."""
    J, I = cfg.index_n_heads, cfg.index_head_dim
    return cfg.q_lora_rank * J * I + cfg.dim * I + 2 * I + cfg.dim * J if J else 0


def attention_params(cfg: ModelConfig) -> int:
    """One MLA layer including its pre-norm: wq (or wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo (+ indexer)."""
    H, D = cfg.n_heads, cfg.dim
    if cfg.q_lora_rank:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    else:
        q = D * H * cfg.qk_head_dim
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = H * cfg.v_head_dim * D
    bias = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim + D if cfg.attn_bias else 0  # wq_a, wkv_a, wo
    return q + kv + out + bias + D + indexer_params(cfg)  # + attn_norm


def _ffn_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, active) parameters of one FFN including its pre-norm."""
    D = cfg.dim
    if not moe:
        n = 3 * D * cfg.inter_dim + D
        return n, n
    expert = 3 * D * cfg.moe_inter_dim
    shared = cfg.n_shared_experts * expert + D * cfg.n_routed_experts + D  # shared experts, gate, ffn_norm
    return shared + cfg.n_routed_experts * expert, shared + cfg.n_activated_experts * expert


def _block_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    total, active = _ffn_params(cfg, moe)
    attn = attention_params(cfg)
    return attn + total, attn + active


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """total_params, active_params, mtp_params and embedding_params of cfg (conventions above)."""
    return _counting(cfg).params(cfg)


def mla_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """V2/V3/V3.2: dense prefix and MoE blocks around MLA (+ indexer), MTP modules with eh_proj."""
    embed = head = cfg.vocab_size * cfg.dim
    dense_total, _ = _block_params(cfg, moe=False)
    moe_total, moe_active = _block_params(cfg, moe=True)
    n_moe = cfg.n_moe_layers
    n_dense = cfg.n_layers - n_moe
    total = embed + head + cfg.dim + n_dense * dense_total + n_moe * moe_total
    active = head + cfg.dim + n_dense * dense_total + n_moe * moe_active
    mtp_block = moe_total if n_moe else dense_total
    mtp = cfg.n_mtp_layers * (3 * cfg.dim + 2 * cfg.dim * cfg.dim + mtp_block)  # enorm, hnorm, norm, eh_proj
    return {"total_params": total, "active_params": active, "mtp_params": mtp, "embedding_params": embed}


def kv_cache_bytes(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Cache bytes per token; for V4 averaged over a context of seq_len tokens (default: min(max_seq_len, 4096))."""
    return _counting(cfg).kv_cache(cfg, seq_len or min(cfg.max_seq_len, 4096))


def _mla_kv_cache_bytes(cfg: ModelConfig, S: int) -> dict[str, int]:
    """V2/V3/V3.2: the same entries for every token, whatever the context S."""
    absorbed = (cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.index_n_heads else 0))
    absorbed *= cfg.n_layers * BYTES_BF16
    naive = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.n_layers * BYTES_BF16
    naive += (cfg.index_head_dim if cfg.index_n_heads else 0) * cfg.n_layers * BYTES_BF16
    return {"kv_cache_bytes_per_token": absorbed, "kv_cache_bytes_per_token_naive": naive}


def causal_attention_flops(n_layers: int, n_heads: int, qk_dim: int, v_dim: int, seq_len: int) -> float:
    """Training FLOPs per token of QKᵀ and PV under a causal mask (lower triangle: S/2 keys on average)."""
    return 6 * n_layers * n_heads * (qk_dim + v_dim) * seq_len / 2


def model_stats(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """The `nanoseek stats --json` record of one config (keys are a contract)."""
    seq_len = seq_len or min(cfg.max_seq_len, 4096)
    counts = param_counts(cfg)
    attn = 3 * attention_flops(cfg, seq_len, causal=True)  # forward + backward
    return {
        "total_params": counts["total_params"], "active_params": counts["active_params"],
        "mtp_params": counts["mtp_params"], **kv_cache_bytes(cfg, seq_len),
        "train_flops_per_token": 6 * counts["active_params"] + attn, "seq_len": seq_len,
    }


def train_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
    """Training FLOPs per token, optionally with what the MTP modules add (their block, eh_proj, head pass)."""
    flops = model_stats(cfg, seq_len)["train_flops_per_token"]
    if include_mtp and cfg.n_mtp_layers:
        per_depth, attn = _counting(cfg).mtp_depth(cfg, seq_len)
        flops += cfg.n_mtp_layers * (6 * per_depth + attn)
    return flops


def _mla_mtp_depth(cfg: ModelConfig, S: int) -> tuple[float, float]:
    """One MTP depth: (active params of its block, eh_proj and the head pass; training attention FLOPs)."""
    _, block_active = _block_params(cfg, moe=cfg.n_moe_layers > 0)
    per_depth = block_active + 2 * cfg.dim * cfg.dim + cfg.vocab_size * cfg.dim
    return per_depth, 3 * attention_flops(cfg, S, causal=True) / cfg.n_layers  # every layer alike


def forward_flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
    """FLOPs of one forward pass per token at a mean context of seq_len tokens, without the MTP modules: a third
    of the training figure (backward = 2 × forward). Sampling a token costs the same as scoring it, so the RL,
    distillation and SFT stages count their compute with it (rollouts 1×, updates 3×, per token)."""
    return train_flops_per_token(cfg, max(1, round(seq_len)), include_mtp=False) / 3


# ----------------------------------------------------------------------------- attention FLOPs


def _mean_seen(S: int, cap: int, causal: bool) -> float:
    """Keys a query reads when it may read at most `cap`: averaged over the positions of an S-token sequence
    (causal: the lower triangle, S/2 when cap >= S, cap - cap²/2S below), or for one query after S keys."""
    if not causal:
        return float(min(S, cap))
    return S / 2 if cap >= S else cap - cap * cap / (2 * S)


def attention_flops(cfg: ModelConfig, S: int, causal: bool) -> float:
    """Forward attention FLOPs per token (QKᵀ and PV, plus the indexers' scores) at context S: averaged over the
    causal positions of an S-token sequence (training), or for one query after S keys (decoding). Multiply by
    3 for forward + backward. V2/V3 MLA: H·(d_qk + d_v)·2 per key in both cases (absorbed decoding reads
    C + R and C per head per key instead; reported by `inference_flops_per_token`)."""
    return _counting(cfg).attention_flops(cfg, S, causal)


def _mla_attention_flops(cfg: ModelConfig, S: int, causal: bool) -> float:
    """V2/V3: every head reads every visible key."""
    keys = _mean_seen(S, S, causal)
    return 2 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys


def _dsa_attention_flops(cfg: ModelConfig, S: int, causal: bool) -> float:
    """V3.2: the indexer scores every visible key, MLA reads its top-k."""
    keys = _mean_seen(S, S, causal)
    index = 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * keys  # J·I MACs per key, then the J weights
    sparse = _mean_seen(S, cfg.index_topk, causal)
    return cfg.n_layers * (2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * sparse + index)


def _v4_layer_attention_flops(cfg: ModelConfig, kind: str, S: int, causal: bool) -> float:
    """One V4 layer: 2·2·H·head_dim per key read (QKᵀ and PV, K = V), keys = window + compressed entries
    (all ended ones in HCA, top-k in CSA), plus CSA's indexer over the compressed keys."""
    window = _mean_seen(S, cfg.window_size, causal)
    if kind == "sliding":
        return 4 * cfg.n_heads * cfg.head_dim * window
    m = cfg.csa_ratio if kind == "csa" else next(r for r in cfg.compress_ratios if r and r != cfg.csa_ratio)
    n = S // m
    ended = (n / 2 if causal else n)  # entries ended by a position, on average
    seen = ended if kind == "hca" else (_mean_seen(n, cfg.index_topk, causal) if n else 0.0)
    index = 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * ended if kind == "csa" else 0.0
    return 4 * cfg.n_heads * cfg.head_dim * (window + seen) + index


def _v4_attention_flops(cfg: ModelConfig, S: int, causal: bool) -> float:
    return sum(_v4_layer_attention_flops(cfg, cfg.layer_kind(i), S, causal) for i in range(cfg.n_layers))


def inference_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """FLOPs to decode one token after `context` tokens: 2 × active params + attention (absorbed MLA reads
    2·H·(2C + R) per key; V3.2 and V4 as in attention_flops)."""
    active = param_counts(cfg)["active_params"]
    return 2 * active + _counting(cfg).decode_attention_flops(cfg, context)


def _mla_decode_flops(cfg: ModelConfig, context: int) -> float:
    """Absorbed MLA decoding: scores over C + R and the weighted sum over C, per head per cached key."""
    return 2 * cfg.n_layers * cfg.n_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * context


def _dsa_decode_flops(cfg: ModelConfig, context: int) -> float:
    """Absorbed MLA over the indexer's top-k, plus the indexer over every cached key."""
    keys = min(context, cfg.index_topk)
    return cfg.n_layers * (2 * cfg.n_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * keys
                           + 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * context)


# ----------------------------------------------------------------------------- V4


def _v4_attention_params(cfg: ModelConfig, kind: str) -> int:
    """One V4 attention layer with its pre-norm: q latent, shared K=V, grouped output, sinks, compressors, indexer."""
    D, H, hd, Q, G = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups
    n = D * Q + Q + Q * H * hd + D * hd + hd + G * cfg.o_lora_rank * (H * hd // G + D) + H + D
    if kind == "sliding":
        return n
    m = cfg.csa_ratio if kind == "csa" else next(r for r in cfg.compress_ratios if r and r != cfg.csa_ratio)
    width = (2 if kind == "csa" else 1) * hd
    n += 2 * D * width + m * width + hd  # wkv, wgate, ape, norm
    if kind == "csa":
        J, I = cfg.index_n_heads, cfg.index_head_dim
        n += Q * J * I + D * J + 2 * D * 2 * I + m * 2 * I + I  # wq_b, weights_proj, its compressor
    return n


def _v4_block_params(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """(total, active) of one V4 block: attention, MoE (router, experts, one shared) and two mHC sites."""
    N, D = cfg.hc_mult, cfg.dim
    expert = 3 * D * cfg.moe_inter_dim
    hc = 2 * ((N + 2) * N * N * D + (N + 2) * N + 3)
    common = _v4_attention_params(cfg, kind) + D * cfg.n_routed_experts + expert + D + hc
    return common + cfg.n_routed_experts * expert, common + cfg.n_activated_experts * expert


def v4_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """V4 parameters (same conventions as param_counts); `mtp_active` for the FLOPs of the MTP modules."""
    embed = cfg.vocab_size * cfg.dim
    N, D = cfg.hc_mult, cfg.dim
    head = embed + D + N * N * D + N + 1  # output head, final norm, hc_head
    blocks = [_v4_block_params(cfg, cfg.layer_kind(i)) for i in range(cfg.n_layers)]
    mtp_total, mtp_active = _v4_block_params(cfg, "sliding")
    extra = 3 * D + 2 * D * D + N * N * D + N + 1  # enorm, hnorm, norm, e_proj, h_proj, hc_head
    return {"total_params": embed + head + sum(t for t, _ in blocks), "active_params": head + sum(a for _, a in blocks),
            "mtp_params": cfg.n_mtp_layers * (mtp_total + extra), "embedding_params": embed,
            "mtp_active": cfg.n_mtp_layers * (mtp_active + extra)}


def v4_kv_cache_bytes(cfg: ModelConfig, S: int) -> dict[str, int]:
    """Bytes per token of an S-token context: per layer min(S, window) raw entries and S/m compressed ones."""
    total = 0
    for i in range(cfg.n_layers):
        kind = cfg.layer_kind(i)
        total += min(S, cfg.window_size) * cfg.head_dim
        if kind != "sliding":
            m = cfg.compress_ratios[i]
            total += (S // m) * (cfg.head_dim + (cfg.index_head_dim if kind == "csa" else 0))
    return {"kv_cache_bytes_per_token": round(total * BYTES_BF16 / S),
            "kv_cache_bytes_per_token_naive": cfg.n_layers * cfg.head_dim * BYTES_BF16}


def _v4_mtp_depth(cfg: ModelConfig, S: int) -> tuple[float, float]:
    """One V4 MTP depth: its sliding-window block, projections and head pass; that block's attention FLOPs."""
    per_depth = v4_param_counts(cfg)["mtp_active"] // cfg.n_mtp_layers + cfg.vocab_size * cfg.dim
    return per_depth, 3 * _v4_layer_attention_flops(cfg, "sliding", S, causal=True)


# ----------------------------------------------------------------------------- per generation


@dataclass(frozen=True)
class Counting:
    """How one generation's parameters, KV cache and attention FLOPs are counted."""

    params: Callable[[ModelConfig], dict[str, int]]  # param_counts' record
    kv_cache: Callable[[ModelConfig, int], dict[str, int]]  # bytes per token of an S-token context
    attention_flops: Callable[[ModelConfig, int, bool], float]  # attention_flops (forward, per token)
    decode_attention_flops: Callable[[ModelConfig, int], float]  # attention of one token decoded after a context
    mtp_depth: Callable[[ModelConfig, int], tuple[float, float]]  # one MTP depth: (active params, training attention)
    cache_holds: tuple[str, str]  # what a token's KV cache holds: (this generation's cache, the naive per-head one)


# Keyed like config.FAMILIES. V3.2 is V3's MLA (indexer parameters and cache included there) with sparse reads.
COUNTING: dict[str, Counting] = {
    "v3": Counting(mla_param_counts, _mla_kv_cache_bytes, _mla_attention_flops, _mla_decode_flops, _mla_mtp_depth,
                   ("absorbed MLA latent + rope key, bf16", "per-head K and V, bf16")),
    "v32": Counting(mla_param_counts, _mla_kv_cache_bytes, _dsa_attention_flops, _dsa_decode_flops, _mla_mtp_depth,
                    ("MLA latent + rope key + indexer key, bf16", "per-head K and V + indexer key, bf16")),
    "v4": Counting(v4_param_counts, v4_kv_cache_bytes, _v4_attention_flops,
                   lambda cfg, context: _v4_attention_flops(cfg, context, causal=False), _v4_mtp_depth,
                   ("window + compressed entries, averaged over the context, bf16", "every token's raw K=V, bf16")),
}


def _counting(cfg: ModelConfig) -> Counting:
    return family_entry(COUNTING, cfg.family, "stats.COUNTING")


# ----------------------------------------------------------------------------- dense GQA models


@dataclass(frozen=True)
class DenseSpec:
    """The minimum that fixes a dense GQA decoder's parameters, KV cache and FLOPs."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    qkv_bias: bool = False
    tied: bool = False

    def stats(self, seq_len: int = 4096) -> dict:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * (q + 2 * kv) + q * self.dim + ((q + 2 * kv) if self.qkv_bias else 0)
        layer = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim  # + two norms
        embed = self.vocab_size * self.dim
        head = 0 if self.tied else embed
        body = self.n_layers * layer + self.dim
        active = body + embed  # the head is a matmul for every token (tied or not)
        return {
            "total_params": embed + head + body, "active_params": active, "mtp_params": 0,
            "kv_cache_bytes_per_token": 2 * kv * self.n_layers * BYTES_BF16,
            "kv_cache_bytes_per_token_naive": 2 * kv * self.n_layers * BYTES_BF16,
            "train_flops_per_token": 6 * active + causal_attention_flops(
                self.n_layers, self.n_heads, self.head_dim, self.head_dim, seq_len),
            "seq_len": seq_len,
        }


# Public configs of the dense comparison models (Qwen2.5-72B config.json; Llama 3.1 paper, Table 3).
DENSE_MODELS = {
    "Qwen2.5-72B": DenseSpec(vocab_size=152064, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                             ffn_dim=29568, qkv_bias=True),
    "LLaMA-3.1-405B": DenseSpec(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                                head_dim=128, ffn_dim=53248),
}


def compare_rows(seq_len: int = 4096) -> list[dict]:
    """The published comparison: DeepSeek-V2, DeepSeek-V3, Qwen2.5-72B, LLaMA-3.1-405B (ISCA'25 Tables 1-2)."""
    from .config import get_preset

    rows = [{"name": "DeepSeek-V2", **model_stats(get_preset("deepseek-v2"), seq_len)},
            {"name": "DeepSeek-V3", **model_stats(get_preset("deepseek-v3"), seq_len)}]
    rows += [{"name": name, **spec.stats(seq_len)} for name, spec in DENSE_MODELS.items()]
    return rows


# ----------------------------------------------------------------------------- cost

# Dense BF16 tensor-core peaks (FLOP/s). H800 = H100 SXM compute; V3's 432 TFLOPS at 43.73% MFU implies 989.
GPU_PEAK_FLOPS = {"h800": 989e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12}
DEFAULT_MFU = 0.3894  # DeepSeek-V3's measured causal MFU on 2048 H800s (ISCA'25 Table 4)
DEFAULT_PRICE = 2.0  # USD per GPU-hour: the V3 report's H800 rental assumption
DEFAULT_GPUS = 2048  # V3's cluster


def training_cost(cfg: ModelConfig, tokens: float, gpu: str, mfu: float = DEFAULT_MFU,
                  price: float = DEFAULT_PRICE, n_gpus: int = DEFAULT_GPUS, seq_len: int = 4096) -> dict:
    """GPU-hours, dollars and wall-clock days to train `cfg` on `tokens` tokens."""
    if gpu not in GPU_PEAK_FLOPS:
        raise ValueError(f"unknown gpu {gpu!r}; choose from {', '.join(GPU_PEAK_FLOPS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if tokens <= 0 or price < 0 or n_gpus <= 0:
        raise ValueError("--tokens and --gpus must be positive and --price non-negative")
    flops_per_token = model_stats(cfg, seq_len)["train_flops_per_token"]
    total_flops = flops_per_token * tokens
    gpu_hours = total_flops / (GPU_PEAK_FLOPS[gpu] * mfu) / 3600
    return {
        "gpu": gpu, "tokens": tokens, "mfu": mfu, "price_per_gpu_hour": price, "seq_len": seq_len,
        "train_flops_per_token": flops_per_token, "total_flops": total_flops, "gpu_hours": gpu_hours,
        "usd": gpu_hours * price, "n_gpus": n_gpus, "days": gpu_hours / n_gpus / 24,
    }
