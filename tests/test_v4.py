"""DeepSeek-V4 (and the V3.2/V4 config and stats): presets against the published figures, validation, logit
parity with transformers both ways, the attention paths, mHC and routing pieces, cached decoding, FP8/FP4."""

import pytest

from nanoseek import ModelConfig, get_preset
from nanoseek.stats import inference_flops_per_token, kv_cache_bytes, model_stats

# ----------------------------------------------------------------------------- config and stats


def test_v4_presets_match_the_published_sizes():
    """V4-Flash 284B / 13B and V4-Pro 1.6T / 49B (model cards); MTP of Flash 6.6B."""
    flash, pro = model_stats(get_preset("deepseek-v4-flash")), model_stats(get_preset("deepseek-v4-pro"))
    assert round(flash["total_params"] / 1e9) == 284 and round(flash["active_params"] / 1e9) == 13
    assert round(pro["total_params"] / 1e12, 1) == 1.6 and round(pro["active_params"] / 1e9) == 49
    assert flash["mtp_params"] / 1e9 == pytest.approx(6.61, abs=0.01)


def test_v4_at_1m_context_against_v32():
    """At 1M tokens V4-Pro decodes with ~27% of V3.2's FLOPs and ~10% of its KV cache (V4 report, model card)."""
    v32, pro = get_preset("deepseek-v3.2"), get_preset("deepseek-v4-pro")
    L = 1 << 20
    flops = inference_flops_per_token(pro, L) / inference_flops_per_token(v32, L)
    kv = kv_cache_bytes(pro, L)["kv_cache_bytes_per_token"] / kv_cache_bytes(v32, L)["kv_cache_bytes_per_token"]
    assert flops == pytest.approx(0.27, abs=0.02) and kv == pytest.approx(0.10, abs=0.02)


def test_v4_cache_depends_on_context_v32_does_not():
    pro, v32 = get_preset("deepseek-v4-pro"), get_preset("deepseek-v3.2")
    short, long = (kv_cache_bytes(pro, S)["kv_cache_bytes_per_token"] for S in (3, 1 << 20))
    assert short == 61 * 512 * 2 and long < short / 5  # below one compressed block: raw entries only
    assert kv_cache_bytes(v32, 128) == kv_cache_bytes(v32, 1 << 20)
    assert kv_cache_bytes(v32)["kv_cache_bytes_per_token"] == 61 * (512 + 64 + 128) * 2


def test_presets_and_schedules():
    flash, pro = get_preset("deepseek-v4-flash"), get_preset("deepseek-v4-pro")
    assert flash.compress_ratios[:4] == (0, 0, 4, 128) and flash.compress_ratios[-1] == 4
    assert pro.compress_ratios[:4] == (128, 128, 4, 128) and len(pro.compress_ratios) == 61
    assert [pro.layer_kind(i) for i in range(3)] == ["hca", "hca", "csa"] and flash.layer_kind(0) == "sliding"
    assert (flash.family, get_preset("deepseek-v3.2").family, get_preset("deepseek-v3").family) == ("v4", "v32", "v3")
    assert flash.softmax_scale == 512**-0.5 and flash.normalize_topk
    small, small_v4 = model_stats(get_preset("small"), 512), model_stats(get_preset("small-v4"), 512)
    assert 0.5 < small_v4["total_params"] / small["total_params"] < 1.5  # sized like small


def test_json_roundtrip_keeps_the_schedule(tmp_path):
    cfg = get_preset("small-v4")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg and isinstance(cfg.compress_ratios, tuple)


@pytest.mark.parametrize("change,match", [
    (dict(compress_ratios=(0, 4)), "one entry per layer"),
    (dict(compress_ratios=(4, 8, 16)), "at most two rates"),
    (dict(n_heads=3), "o_groups"),
    (dict(index_n_heads=0), "CSA layers need the lightning indexer"),
    (dict(n_shared_experts=2), "exactly one shared expert"),
    (dict(swiglu_limit=0.0), "swiglu_limit"),
    (dict(route_norm=False), "renormalises"),
    (dict(qk_rope_head_dim=64), "head_dim must be even and >= qk_rope_head_dim"),
])
def test_v4_validation(change, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny-v4", **change)


@pytest.mark.parametrize("change,match", [
    (dict(q_lora_rank=0), "q_lora_rank must be > 0"),
    (dict(index_head_dim=4), "index_head_dim"),
    (dict(score_func="sqrtsoftplus"), "V4's"),
    (dict(n_hash_layers=1), "V4 features"),
])
def test_v32_validation(change, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny-v32", **change)
