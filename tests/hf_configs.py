"""Random tiny Hugging Face DeepSeek configurations (V2, V3, V3.2, V4) covering the space transformers accepts.

The V3.2 / V4 ones keep the indexer top-k, the sliding window and the compression rates small against the test
sequences (40 tokens), so that selection, the window and several compressed blocks are all exercised."""

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


def random_v32_config(rng: random.Random) -> dict:
    """A V3 config with the lightning indexer (V3.2 needs query compression); top-k well below 40 tokens."""
    d = random_hf_config(rng, "deepseek_v3")
    d.pop("rope_interleave")
    d.update(model_type="deepseek_v32", q_lora_rank=rng.choice([12, 24]), index_n_heads=8,
             index_head_dim=rng.choice([8, 16]), index_topk=rng.choice([3, 5, 8, 16]))
    return d


def random_v4_config(rng: random.Random) -> dict:
    """A tiny V4: random attention schedule, windows of 4-12 tokens, CSA rate 2-4, HCA rate 5-8, mHC 1-4 streams."""
    n_layers = rng.randint(2, 4)
    kinds = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    heads, head_dim = rng.choice([2, 4]), rng.choice([16, 32])
    experts = rng.choice([4, 6])
    return dict(
        model_type="deepseek_v4", vocab_size=rng.choice([61, 96]), hidden_size=rng.choice([32, 48]),
        moe_intermediate_size=rng.choice([8, 16]), num_hidden_layers=n_layers, num_attention_heads=heads,
        head_dim=head_dim, partial_rotary_factor=rng.choice([0.25, 0.5]),
        q_lora_rank=rng.choice([12, 16]), num_experts_per_tok=rng.randint(1, 3), n_routed_experts=experts,
        layer_types=[rng.choice(kinds) for _ in range(n_layers)],
        compress_rates={kinds[1]: rng.choice([2, 3, 4]), kinds[2]: rng.choice([5, 8])},
        sliding_window=rng.choice([4, 8, 12]), o_groups=rng.choice([1, 2]), o_lora_rank=rng.choice([8, 12]),
        index_n_heads=8, index_head_dim=16, index_topk=rng.choice([2, 3, 5]),
        mlp_layer_types=["hash_moe"] * (h := rng.randint(0, n_layers)) + ["moe"] * (n_layers - h),
        scoring_func=rng.choice(["sqrtsoftplus", "sigmoid"]), routed_scaling_factor=rng.choice([1.0, 1.5]),
        hc_mult=rng.choice([1, 2, 4]), hc_sinkhorn_iters=rng.choice([1, 3, 20]), swiglu_limit=rng.choice([0.5, 10.0]),
        max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=rng.choice([1e-6, 1e-5]),
        rope_theta=rng.choice([10000.0, 500.0]), compress_rope_theta=rng.choice([160000.0, 1000.0]),
        rope_parameters=rng.choice([None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                           "beta_fast": 32, "beta_slow": 1}]),
    )


def build_hf_config(d: dict):
    import transformers

    cls = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config,
           "deepseek_v32": transformers.DeepseekV32Config, "deepseek_v4": transformers.DeepseekV4Config}[d["model_type"]]
    return cls(**{k: v for k, v in d.items() if k != "model_type" and v is not None})
