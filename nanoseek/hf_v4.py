"""Hugging Face `deepseek_v4` checkpoints: config.json translation, DeepSeek's tensor names, FP8/FP4 weights.

DeepSeek ships V4 under its own inference names (`layers.3.attn.compressor.wkv.weight`, `hc_head_fn`, per-expert
`ffn.experts.7.w1.weight`, FP8 e4m3 weights with UE8M0 128×128 `.scale` tensors, FP4 experts packed two per
byte with one UE8M0 scale per 32 inputs); transformers' DeepseekV4ForCausalLM renames them on load, and its
save_pretrained writes them back with a `model.` prefix and a few of its own names (`embed_tokens`,
`hc_head.hc_fn`). nanoseek's V4 modules carry DeepSeek's names, so the key map is three rules, and reading
accepts both spellings. hf.py drives loading and saving; this module has no I/O.
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig
from .fp8 import quantize_weight

LAYER_TYPES = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
               "hca": "heavily_compressed_attention"}


# ----------------------------------------------------------------------------- config translation


def _schedule(d: dict) -> tuple[tuple[int, ...], int]:
    """(compress_ratios, csa_ratio) from HF layer_types + compress_rates, or DeepSeek's compress_ratios."""
    n = d["num_hidden_layers"]
    rates = {"compressed_sparse_attention": d.get("compress_rate_csa", 4),
             "heavily_compressed_attention": d.get("compress_rate_hca", 128), **(d.get("compress_rates") or {})}
    types = d.get("layer_types")
    if types is None and d.get("compress_ratios") is not None:  # DeepSeek's own: 0 / 4 (CSA) / 128 (HCA)
        ratios = tuple(int(r) for r in d["compress_ratios"][:n])
        if not set(ratios) <= {0, 4, 128}:
            raise ValueError(f"compress_ratios must use 0, 4 and 128 (got {sorted(set(ratios))}); give layer_types "
                             "and compress_rates for other rates")
        return ratios, 4
    if types is None:  # transformers' default schedule: 2 HCA, then HCA/CSA alternating
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    kinds = {v: k for k, v in LAYER_TYPES.items()}
    if any(t not in kinds for t in types[:n]):
        raise ValueError(f"unsupported layer_types {sorted(set(types))}")
    csa, hca = rates["compressed_sparse_attention"], rates["heavily_compressed_attention"]
    used = {kinds[t] for t in types[:n]}
    if {"csa", "hca"} <= used and csa == hca:
        raise ValueError(f"CSA and HCA layers with the same compress rate ({csa}) are not supported")
    return tuple(0 if kinds[t] == "sliding" else csa if kinds[t] == "csa" else hca for t in types[:n]), csa


def _hash_layers(d: dict) -> int:
    types = d.get("mlp_layer_types")
    if types is None:
        return min(d.get("num_hash_layers", 3), d["num_hidden_layers"])
    n = sum(t == "hash_moe" for t in types)
    if list(types) != ["hash_moe"] * n + ["moe"] * (len(types) - n):
        raise ValueError(f"unsupported mlp_layer_types {types}: nanoseek needs the hash layers first")
    return n


def _main_rope_theta(d: dict) -> float:
    rope = d.get("rope_parameters") or {}
    main = rope.get("main") if isinstance(rope.get("main"), dict) else None
    if main is not None and main.get("rope_type", "default") != "default":
        raise ValueError("unsupported deepseek_v4 rope: the sliding-window layers' RoPE must be plain (default)")
    return float((main or {}).get("rope_theta", d.get("rope_theta", 10000.0)))


def config_from_hf_v4(d: dict, compress_rope: dict) -> ModelConfig:
    """deepseek_v4 config.json -> ModelConfig. compress_rope: hf._rope_from_hf of the compressed layers' RoPE."""
    if d.get("hidden_act", "silu") != "silu" or d.get("mlp_bias") or d.get("attention_bias"):
        raise ValueError("unsupported deepseek_v4 config: needs hidden_act silu and no biases")
    if d.get("num_key_value_heads", 1) != 1:
        raise ValueError("deepseek_v4 attention has one shared key/value head (num_key_value_heads = 1)")
    head_dim = d.get("head_dim", 512)
    rope_dim = d.get("qk_rope_head_dim") or int(head_dim * (d.get("partial_rotary_factor") or 64 / 512))
    ratios, csa = _schedule(d)
    compress = dict(compress_rope)
    compress_theta = compress.pop("rope_theta")
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], moe_inter_dim=d.get("moe_intermediate_size", 2048),
        inter_dim=0, n_layers=d["num_hidden_layers"], n_dense_layers=0, n_heads=d["num_attention_heads"],
        n_routed_experts=d.get("n_routed_experts", 256), n_shared_experts=1,
        n_activated_experts=d.get("num_experts_per_tok", 6), n_expert_groups=1, n_limited_groups=1,
        score_func=d.get("scoring_func", "sqrtsoftplus"), route_scale=float(d.get("routed_scaling_factor", 1.5)),
        route_norm=True, q_lora_rank=d.get("q_lora_rank", 1024), kv_lora_rank=0, qk_nope_head_dim=0, v_head_dim=0,
        qk_rope_head_dim=rope_dim, head_dim=head_dim, max_seq_len=d.get("max_position_embeddings", 1048576),
        norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=_main_rope_theta(d), compress_rope_theta=compress_theta,
        **compress, compress_ratios=ratios, csa_ratio=csa, window_size=d.get("sliding_window", 128),
        o_groups=d.get("o_groups", 8), o_lora_rank=d.get("o_lora_rank", 1024), hc_mult=d.get("hc_mult", 4),
        hc_sinkhorn_iters=d.get("hc_sinkhorn_iters", 20), hc_eps=d.get("hc_eps", 1e-6),
        n_hash_layers=_hash_layers(d), swiglu_limit=float(d.get("swiglu_limit", 10.0)),
        index_n_heads=d.get("index_n_heads", 64), index_head_dim=d.get("index_head_dim", 128),
        index_topk=d.get("index_topk", 512), n_mtp_layers=d.get("num_nextn_predict_layers", 0) or 0,
    )


def config_to_hf_v4(cfg: ModelConfig, dtype: torch.dtype, rope_scaling: dict | None) -> dict:
    """ModelConfig -> deepseek_v4 config.json (transformers' layer_types/compress_rates and DeepSeek's fields)."""
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    hca = [r for r, k in zip(cfg.compress_ratios, kinds) if k == "hca"]
    rates = {LAYER_TYPES["csa"]: cfg.csa_ratio, LAYER_TYPES["hca"]: hca[0] if hca else 128}
    if rope_scaling is not None:
        rope_scaling = {k: v for k, v in rope_scaling.items() if k not in ("mscale", "mscale_all_dim")}
        rope_scaling["attention_factor"] = 1.0
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "partial_rotary_factor": cfg.qk_rope_head_dim / cfg.head_dim,
        "q_lora_rank": cfg.q_lora_rank, "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
        "sliding_window": cfg.window_size, "layer_types": [LAYER_TYPES[k] for k in kinds], "compress_rates": rates,
        "compress_ratios": list(cfg.compress_ratios) + [0] * cfg.n_mtp_layers,  # DeepSeek's: the MTP's is 0
        "mlp_layer_types": ["hash_moe"] * cfg.n_hash_layers + ["moe"] * (cfg.n_layers - cfg.n_hash_layers),
        "num_hash_layers": cfg.n_hash_layers, "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": 1,
        "num_experts_per_tok": cfg.n_activated_experts, "scoring_func": cfg.score_func, "norm_topk_prob": True,
        "routed_scaling_factor": cfg.route_scale, "topk_method": "noaux_tc", "swiglu_limit": cfg.swiglu_limit,
        "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "num_nextn_predict_layers": cfg.n_mtp_layers, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta, "rope_scaling": rope_scaling,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ----------------------------------------------------------------------------- tensor names


def v4_key(name: str) -> str:
    """Our state-dict key -> DeepSeek's; stacked routed experts get an '{e}' placeholder for the expert index."""
    key = re.sub(r"(^|\.)hc_(head|attn|ffn)\.(fn|base|scale)$", r"\1hc_\2_\3", name)
    m = re.fullmatch(r"(.+\.ffn\.experts)\.(w[123])", key)
    return f"{m.group(1)}.{{e}}.{m.group(2)}.weight" if m else key


def normalize_v4_key(key: str) -> str:
    """A checkpoint key in DeepSeek's or transformers' spelling -> DeepSeek's (transformers writes the attention's
    kv_norm as `attn.norm`, the embedding as `embed_tokens`, the final collapse as `hc_head.hc_*`)."""
    key = key.removeprefix("model.")
    key = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight"}.get(key, key)
    key = re.sub(r"\.attn\.norm\.weight$", ".attn.kv_norm.weight", key)
    return re.sub(r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1", key)


def v4_mtp_layers(keys) -> int:
    return len({m.group(1) for k in keys if (m := re.match(r"(?:model\.)?mtp\.(\d+)\.", k))})


def is_extra_v4_mtp(key: str, n_mtp: int) -> bool:
    m = re.match(r"(?:model\.)?mtp\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= n_mtp


def v4_scale_key(key: str) -> str:
    return key.removesuffix(".weight") + ".scale"


# ----------------------------------------------------------------------------- low-precision weights

# e2m1: 1 sign, 2 exponent, 1 mantissa bit (OCP microscaling formats v1.0, §5.3.3)
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP4 experts: packed int8 (M, N/2), element 2j in the low nibble, with one scale per 1×32 block (M, N/32)."""
    u = packed.contiguous().view(torch.uint8).long()
    lo, hi = u & 0xF, u >> 4
    values = torch.stack([lo, hi], dim=-1).flatten(-2)  # (M, N) 4-bit codes
    w = _E2M1[values & 0x7] * torch.where(values >= 8, -1.0, 1.0)
    M, N = w.shape
    if tuple(scale.shape) != (M, N // 32):
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match weight ({M}, {N}) in 1x32 blocks")
    return (w * scale.float().repeat_interleave(32, dim=1)).to(dtype)


def fp8_v4_state(model) -> dict[str, tuple[torch.Tensor, torch.Tensor] | list]:
    """Parameter name -> (e4m3 weight, UE8M0 scale) for what DeepSeek ships in FP8: the attention projections,
    the indexer's query projection and the experts (routed ones per expert). Compressors, the indexer's head
    weights, routers, norms, mHC, embedding and head stay in the model's dtype."""
    e8m0 = getattr(torch, "float8_e8m0fnu", None)

    def q(w):
        weight, scale = quantize_weight(w.detach(), ue8m0=True)
        return weight, scale.to(e8m0) if e8m0 is not None else scale

    out = {}
    pattern = re.compile(r".*\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])\.weight")
    for name, p in model.named_parameters():
        if pattern.fullmatch(name):
            out[name] = q(p)
        elif re.fullmatch(r".*\.ffn\.experts\.w[123]", name):
            out[name] = [q(p[e]) for e in range(p.shape[0])]
    return out
