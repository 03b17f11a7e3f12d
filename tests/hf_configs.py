"""Random tiny Hugging Face DeepSeek-V2/V3 configurations covering the space transformers accepts."""

from __future__ import annotations

import random


def random_rope(rng: random.Random) -> dict:
    """Default RoPE or YaRN, with the mscale / attention_factor / truncate variants HF understands."""
    theta = rng.choice([10000.0, 500.0])
    if rng.random() < 0.3:
        return {"rope_type": "default", "rope_theta": theta}
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": rng.choice([2.0, 4.0, 40.0]),
            "original_max_position_embeddings": rng.choice([8, 16]),
            "beta_fast": rng.choice([32, 16]), "beta_slow": rng.choice([1, 2])}
    variant = rng.randrange(5)
    if variant == 0:
        rope.update(mscale=1.0, mscale_all_dim=1.0)  # DeepSeek-V3
    elif variant == 1:
        rope.update(mscale=0.707, mscale_all_dim=0.707)  # DeepSeek-V2
    elif variant == 2:
        rope.update(mscale=1.0, mscale_all_dim=0.5)  # cos/sin scaled by the mscale ratio
    elif variant == 3:
        rope.update(attention_factor=1.3)
    if rng.random() < 0.25:
        rope["truncate"] = False
    return rope


def random_hf_config(rng: random.Random, family: str) -> dict:
    """A random tiny config dict for DeepseekV3Config / DeepseekV2Config (model_type included)."""
    heads = rng.choice([1, 2, 4])
    n_group = rng.choice([1, 2, 4])
    per_group = rng.choice([2, 3, 4])
    topk_group = rng.randint(1, n_group)
    n_layers = rng.randint(1, 3)
    d = dict(
        model_type=family, vocab_size=rng.choice([61, 96, 128]), hidden_size=rng.choice([32, 48, 64]),
        intermediate_size=rng.choice([40, 64]), moe_intermediate_size=rng.choice([8, 16]),
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=heads,
        n_shared_experts=rng.choice([0, 1, 2]), n_routed_experts=n_group * per_group,
        num_experts_per_tok=rng.randint(1, min(4, topk_group * per_group)),
        routed_scaling_factor=rng.choice([1.0, 2.5, 16.0]), kv_lora_rank=rng.choice([8, 16]),
        q_lora_rank=rng.choice([None, 12, 24]), qk_nope_head_dim=rng.choice([8, 16]),
        qk_rope_head_dim=rng.choice([4, 8]), v_head_dim=rng.choice([8, 12, 16]),
        first_k_dense_replace=rng.randint(0, n_layers), max_position_embeddings=64,
        attention_bias=rng.random() < 0.25, initializer_range=0.1, rms_norm_eps=rng.choice([1e-6, 1e-5]),
        rope_parameters=random_rope(rng), tie_word_embeddings=rng.random() < 0.15,
    )
    if family == "deepseek_v3":
        d.update(n_group=n_group, topk_group=topk_group, norm_topk_prob=rng.random() < 0.7,
                 rope_interleave=rng.random() < 0.75)
    else:
        grouped = rng.random() < 0.6
        d.update(topk_method="group_limited_greedy" if grouped else "greedy",
                 n_group=n_group if grouped else None, topk_group=topk_group if grouped else None)
        if not grouped:
            d["num_experts_per_tok"] = rng.randint(1, min(4, d["n_routed_experts"]))
    return d


def build_hf_config(d: dict):
    from transformers import DeepseekV2Config, DeepseekV3Config

    cls = DeepseekV3Config if d["model_type"] == "deepseek_v3" else DeepseekV2Config
    return cls(**{k: v for k, v in d.items() if k != "model_type"})
