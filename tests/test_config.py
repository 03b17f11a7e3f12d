import pytest

from nanoseek import ModelConfig, get_preset
from nanoseek.config import PRESETS


def test_presets_official_values():
    v3 = get_preset("deepseek-v3")
    assert (v3.dim, v3.n_layers, v3.n_dense_layers, v3.n_heads, v3.vocab_size) == (7168, 61, 3, 128, 129280)
    assert (v3.n_routed_experts, v3.n_activated_experts, v3.n_expert_groups, v3.n_limited_groups) == (256, 8, 8, 4)
    assert (v3.score_func, v3.route_scale, v3.q_lora_rank, v3.kv_lora_rank, v3.n_mtp_layers) == ("sigmoid", 2.5, 1536, 512, 1)
    v2 = get_preset("deepseek-v2")
    assert (v2.dim, v2.n_routed_experts, v2.n_shared_experts, v2.route_scale, v2.score_func) == (5120, 160, 2, 16.0, "softmax")
    lite = get_preset("deepseek-v2-lite")
    assert (lite.q_lora_rank, lite.n_layers, lite.moe_inter_dim, lite.mscale) == (0, 27, 1408, 0.707)
    assert v3.init_std == 0.006 and v3.normalize_topk and not v2.normalize_topk


def test_small_preset_is_speedrun_sized():
    from nanoseek.stats import model_stats
    s = model_stats(get_preset("small"))
    assert 5e6 <= s["total_params"] <= 20e6 and 1e6 <= s["active_params"] <= 3.5e6
    assert 2000 <= get_preset("small").vocab_size <= 8000


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="presets: " + ", ".join(PRESETS)):
        get_preset("deepseek-v4")


@pytest.mark.parametrize("change,match", [
    (dict(n_routed_experts=10, n_expert_groups=4), "divisible"),
    (dict(n_activated_experts=9, n_expert_groups=4, n_limited_groups=1), "n_activated_experts"),
    (dict(score_func="relu"), "score_func"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(qk_rope_head_dim=7), "even"),
])
def test_validation(change, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny", **change)


def test_json_roundtrip_and_unknown_keys(tmp_path):
    cfg = get_preset("small")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys: dimm"):
        ModelConfig.from_dict({**cfg.to_dict(), "dimm": 3})
