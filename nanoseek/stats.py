"""Parameters, KV cache, training FLOPs and GPU cost from a config (reference/deepseek-v3.md §2.4, §4.4, §5).

Conventions (stated wherever numbers are printed):
- `active_params` counts what one token touches, *without* the embedding lookup (a gather, no FLOPs) but
  *with* the output head: V3 gives 36.6B, DeepSeek's "37B".
- `total_params` excludes the MTP modules (DeepSeek's 671B); `mtp_params` counts what the MTP modules add
  (their embedding and head are shared with the main model).
- `train_flops_per_token` = 6 × active_params + causal attention: per layer 6 × (S/2) × H × (d_qk + d_v), i.e.
  forward + backward (×3) of QKᵀ and PV over the lower triangle only. V3 at 4K: 250.5 GFLOP (ISCA'25: 250).
- KV cache bytes are bf16 (2 bytes per element): the absorbed MLA cache stores (kv_lora_rank +
  qk_rope_head_dim) values per token per layer; the naive one per-head K and V.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

BYTES_BF16 = 2


# ----------------------------------------------------------------------------- MoE / MLA models


def attention_params(cfg: ModelConfig) -> int:
    """One MLA layer including its pre-norm: wq (or wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo."""
    H, D = cfg.n_heads, cfg.dim
    if cfg.q_lora_rank:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    else:
        q = D * H * cfg.qk_head_dim
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = H * cfg.v_head_dim * D
    bias = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim + D if cfg.attn_bias else 0  # wq_a, wkv_a, wo
    return q + kv + out + bias + D  # + attn_norm


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


def kv_cache_bytes(cfg: ModelConfig) -> dict[str, int]:
    absorbed = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * BYTES_BF16
    naive = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.n_layers * BYTES_BF16
    return {"kv_cache_bytes_per_token": absorbed, "kv_cache_bytes_per_token_naive": naive}


def causal_attention_flops(n_layers: int, n_heads: int, qk_dim: int, v_dim: int, seq_len: int) -> float:
    """Training FLOPs per token of QKᵀ and PV under a causal mask (lower triangle: S/2 keys on average)."""
    return 6 * n_layers * n_heads * (qk_dim + v_dim) * seq_len / 2


def model_stats(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """The `nanoseek stats --json` record of one config (keys are a contract)."""
    seq_len = seq_len or min(cfg.max_seq_len, 4096)
    counts = param_counts(cfg)
    attn = causal_attention_flops(cfg.n_layers, cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim, seq_len)
    return {
        "total_params": counts["total_params"], "active_params": counts["active_params"],
        "mtp_params": counts["mtp_params"], **kv_cache_bytes(cfg),
        "train_flops_per_token": 6 * counts["active_params"] + attn, "seq_len": seq_len,
    }


def train_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
    """Training FLOPs per token, optionally with what the MTP modules add (their block, eh_proj, head pass)."""
    flops = model_stats(cfg, seq_len)["train_flops_per_token"]
    if include_mtp and cfg.n_mtp_layers:
        _, block_active = _block_params(cfg, moe=cfg.n_moe_layers > 0)
        per_depth = block_active + 2 * cfg.dim * cfg.dim + cfg.vocab_size * cfg.dim
        attn = causal_attention_flops(1, cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim, seq_len)
        flops += cfg.n_mtp_layers * (6 * per_depth + attn)
    return flops


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
