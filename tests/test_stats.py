"""The published scale numbers come out of nanoseek.stats (V3 report arXiv 2412.19437 and DeepSeek-V2 arXiv 2405.04434)."""

import pytest
import torch

from nanoseek import build_model, get_preset
from nanoseek.stats import compare_rows, kv_cache_bytes, model_stats, training_cost


def test_deepseek_v3_scale():
    s = model_stats(get_preset("deepseek-v3"), seq_len=4096)
    assert round(s["total_params"] / 1e9) == 671
    assert round(s["active_params"] / 1e9) == 37  # 36.6B without the embedding lookup
    assert s["kv_cache_bytes_per_token"] == 70_272
    assert s["kv_cache_bytes_per_token_naive"] == 128 * (192 + 128) * 61 * 2
    assert s["train_flops_per_token"] / 1e9 == pytest.approx(250, rel=0.01)
    assert s["mtp_params"] / 1e9 == pytest.approx(11.5, rel=0.02)  # README_WEIGHTS: 11.5B unique MTP


def test_deepseek_v2_scale():
    s = model_stats(get_preset("deepseek-v2"), seq_len=4096)
    assert round(s["total_params"] / 1e9) == 236 and round(s["active_params"] / 1e9) == 21
    assert s["kv_cache_bytes_per_token"] == 69_120
    assert s["train_flops_per_token"] / 1e9 == pytest.approx(155, rel=0.01)  # ISCA'25 Table 2


def test_v2_lite_scale():
    s = model_stats(get_preset("deepseek-v2-lite"))
    assert s["total_params"] / 1e9 == pytest.approx(15.7, abs=0.05)


def test_compare_rows():
    rows = {r["name"]: r for r in compare_rows()}
    assert list(rows) == ["DeepSeek-V2", "DeepSeek-V3", "Qwen2.5-72B", "LLaMA-3.1-405B"]
    assert rows["Qwen2.5-72B"]["kv_cache_bytes_per_token"] == 327_680
    assert rows["LLaMA-3.1-405B"]["kv_cache_bytes_per_token"] == 516_096
    assert rows["LLaMA-3.1-405B"]["total_params"] / 1e9 == pytest.approx(405.9, abs=0.1)
    assert rows["Qwen2.5-72B"]["total_params"] / 1e9 == pytest.approx(72.7, abs=0.1)
    # ISCA'25 gives 2,448 GFLOP; our accounting (6N + causal QK and PV) lands 1.0% above it
    assert rows["LLaMA-3.1-405B"]["train_flops_per_token"] / 1e9 == pytest.approx(2448, rel=0.015)
    keys = {"name", "total_params", "active_params", "mtp_params", "kv_cache_bytes_per_token",
            "kv_cache_bytes_per_token_naive", "train_flops_per_token", "seq_len"}
    assert all(set(r) == keys for r in rows.values())


def test_v3_pretraining_cost_row():
    c = training_cost(get_preset("deepseek-v3"), tokens=14.8e12, gpu="h800", mfu=0.3894, price=2)
    assert c["gpu_hours"] / 1e6 == pytest.approx(2.664, rel=0.01)  # report Table 1: 2664K H800 hours
    assert c["usd"] / 1e6 == pytest.approx(5.328, rel=0.01)
    assert c["days"] == pytest.approx(54.2, rel=0.01)  # on 2048 GPUs


def test_cost_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown gpu"):
        training_cost(get_preset("tiny"), 1e9, "a100")
    with pytest.raises(ValueError, match="mfu"):
        training_cost(get_preset("tiny"), 1e9, "h100", mfu=1.5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-v32", "tiny-v4"])
def test_each_generations_cache_answers_for_its_bytes_per_token(preset):
    """model.cache_bytes_per_token (what bench/generations.py measures, with no branch per generation): V3's and
    V3.2's caches hold exactly what stats.kv_cache_bytes counts; V4's window and compressed memories do not grow
    one entry per token, so its cache per position shrinks as the context grows."""
    cfg = get_preset(preset, vocab_size=300)
    model = build_model(cfg).to(torch.bfloat16)
    short, long = model.cache_bytes_per_token(64), model.cache_bytes_per_token(256)
    if preset == "tiny-v4":
        assert long < short and long == model.new_cache(1, 256, rewind=0).nbytes() / 256
    else:
        assert short == long == kv_cache_bytes(cfg, 256)["kv_cache_bytes_per_token"]
