"""DeepSeek-V4 (and the V3.2/V4 config and stats): presets against the published figures, validation, logit
parity with transformers both ways, the attention paths, mHC and routing pieces, cached decoding, FP8/FP4."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import ModelConfig, Transformer, build_model, get_preset
from nanoseek.hf import config_from_hf, config_to_hf, load_hf, save_hf
from nanoseek.hf_v4 import dequantize_fp4
from nanoseek.model_v4 import ClampedExperts, GateV4, HashGate, TransformerV4, sinkhorn
from nanoseek.stats import inference_flops_per_token, kv_cache_bytes, model_stats
from tests.hf_configs import build_hf_config, random_v4_config
from tests.test_hf_parity import TOL, rel_err, tokens_for

transformers = pytest.importorskip("transformers")

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


# ----------------------------------------------------------------------------- parity with transformers

V4_NAMED = dict(  # one layer of each kind: window 8, CSA m = 4 with top-3, HCA m' = 8 (5 blocks of 40 tokens)
    model_type="deepseek_v4", vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, head_dim=16, partial_rotary_factor=0.5, q_lora_rank=16, num_experts_per_tok=2,
    n_routed_experts=4, layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}, sliding_window=8,
    o_groups=2, o_lora_rank=8, index_n_heads=8, index_head_dim=16, index_topk=3,
    mlp_layer_types=["hash_moe", "moe", "moe"], max_position_embeddings=64, initializer_range=0.2,
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
)


@torch.no_grad()
def randomize_v4(model: torch.nn.Module, seed: int) -> None:
    """Move what both libraries initialise to constants (norms, sinks, slot biases, mHC biases and scales,
    routing biases, hash tables) to random values; works on either library's names."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif leaf in ("sinks", "attn_sink", "position_bias", "ape", "base", "scale", "hc_base", "hc_scale"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "gate.bias")):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("tid2eid"):
            E = next(p for n, p in model.named_parameters() if n == name.replace("tid2eid", "weight")).shape[0]
            b.copy_(torch.rand(b.shape[0], E, generator=g).argsort(dim=-1)[:, : b.shape[1]])


def check_hf_to_ours(d: dict, seed: int, tmp_path) -> None:
    torch.manual_seed(seed)
    theirs = transformers.DeepseekV4ForCausalLM(build_hf_config(d)).eval()
    randomize_v4(theirs, seed)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert isinstance(ours, TransformerV4)
    tokens = tokens_for(d["vocab_size"], seed)
    with torch.no_grad():
        ref = theirs(tokens).logits
        for impl in ("naive", "absorb"):
            other = build_model(ours.cfg.replace(attn_impl=impl)).eval()
            other.load_state_dict(ours.state_dict())
            assert rel_err(other(tokens), ref) <= TOL, impl


def check_ours_to_hf(d: dict, seed: int, tmp_path) -> None:
    cfg = config_from_hf(d)
    torch.manual_seed(seed)
    ours = build_model(cfg.replace(n_mtp_layers=1)).eval()
    ours.init_weights(std=0.2)
    randomize_v4(ours, seed)
    save_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = tokens_for(cfg.vocab_size, seed)
    with torch.no_grad():
        assert rel_err(ours(tokens), theirs(tokens).logits) <= TOL


def test_named_config_both_ways(tmp_path):
    check_hf_to_ours(V4_NAMED, seed=7, tmp_path=tmp_path / "a")
    check_ours_to_hf(V4_NAMED, seed=7, tmp_path=tmp_path / "b")


@pytest.mark.parametrize("case", range(4))
def test_random_configs_both_ways(case, tmp_path):
    check_hf_to_ours(random_v4_config(random.Random(4000 + case)), seed=case, tmp_path=tmp_path / "a")
    check_ours_to_hf(random_v4_config(random.Random(4100 + case)), seed=case, tmp_path=tmp_path / "b")


def test_export_uses_deepseek_names_and_config(tmp_path):
    model = tiny_v4()
    save_hf(model, tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"embed.weight", "head.weight", "hc_head_fn", "layers.0.hc_attn_fn", "layers.0.ffn.gate.tid2eid",
            "layers.1.attn.compressor.ape", "layers.1.attn.indexer.compressor.wkv.weight", "layers.1.attn.attn_sink",
            "layers.2.ffn.experts.3.w1.weight", "mtp.0.e_proj.weight", "mtp.0.hc_head_fn"} <= keys
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["compress_ratios"] == [0, 4, 8, 0] and d["num_hash_layers"] == 1
    assert config_from_hf(d) == model.cfg.replace(init_std=d["initializer_range"], route_norm=True, original_seq_len=96)


def test_official_configs_translate_both_ways():
    for name in ("deepseek-v4-flash", "deepseek-v4-pro"):
        cfg = get_preset(name)
        d = config_to_hf(cfg)
        assert d["rope_scaling"]["factor"] == 16 and d["compress_ratios"][-1] == 0
        assert config_from_hf(d) == cfg.replace(route_norm=True)
        official = dict(d, layer_types=None, compress_rates=None, mlp_layer_types=None)  # DeepSeek's own fields
        assert config_from_hf({k: v for k, v in official.items() if v is not None}) == cfg.replace(route_norm=True)


# ----------------------------------------------------------------------------- pieces


def tiny_v4(seed: int = 0, **kw) -> TransformerV4:
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny-v4", max_seq_len=96, **kw)).eval()
    model.init_weights(std=0.1)
    randomize_v4(model, seed)
    return model


def test_official_presets_build_on_meta_with_checkpoint_shapes():
    with torch.device("meta"):
        flash = build_model(get_preset("deepseek-v4-flash"))
    a = flash.layers[2].attn
    assert a.wq_b.weight.shape == (32768, 1024) and a.wkv.weight.shape == (512, 4096)
    assert a.wo_a.weight.shape == (8192, 4096) and a.wo_b.weight.shape == (4096, 8192)
    assert a.compressor.ape.shape == (4, 1024) and a.indexer.compressor.ape.shape == (4, 256)
    assert flash.layers[3].attn.compressor.ape.shape == (128, 512) and not hasattr(flash.layers[3].attn, "indexer")
    assert flash.layers[0].hc_attn.fn.shape == (24, 16384) and flash.layers[0].ffn.gate.tid2eid.shape == (129280, 6)
    assert isinstance(flash.layers[3].ffn.gate, GateV4) and isinstance(flash.mtp[0].ffn.gate, GateV4)


def test_sinkhorn_gives_doubly_stochastic_mixers():
    m = sinkhorn(torch.rand(5, 4, 4) + 0.01, iters=20, eps=1e-6)
    torch.testing.assert_close(m.sum(-1), torch.ones(5, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.ones(5, 4), atol=1e-5, rtol=0)


def test_routing_hash_table_and_sqrtsoftplus():
    cfg = get_preset("tiny-v4")
    hashed, learned = HashGate(cfg), GateV4(cfg)
    torch.nn.init.normal_(hashed.weight)
    learned.weight.data.copy_(hashed.weight)
    hashed.reset_table()
    x, tokens = torch.randn(6, cfg.dim), torch.tensor([3, 3, 9, 9, 200, 3])
    weights, idx, scores = hashed(x, tokens)
    assert torch.equal(idx, hashed.tid2eid[tokens]) and idx[0].unique().numel() == cfg.n_activated_experts
    torch.testing.assert_close(scores, torch.nn.functional.softplus(x @ hashed.weight.T).sqrt())
    torch.testing.assert_close(weights.sum(-1), torch.full((6,), cfg.route_scale))
    _, idx2, _ = learned(x)
    assert torch.equal(idx2, scores.topk(cfg.n_activated_experts).indices)


def test_clamped_experts_loop_and_grouped_agree():
    experts = ClampedExperts(4, 8, 12, limit=0.5)
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w)
    x, idx = 3 * torch.randn(10, 8), torch.randint(0, 4, (10, 2))
    weights = torch.rand(10, 2)
    torch.testing.assert_close(experts(x, weights, idx), experts.forward_loop(x, weights, idx))
    h = experts.act(torch.tensor([5.0, -5.0]), torch.tensor([5.0, -5.0]))
    torch.testing.assert_close(h, torch.nn.functional.silu(torch.tensor([0.5, -5.0])) * torch.tensor([0.5, -0.5]))


def test_blocked_attention_equals_the_reference():
    """Small query blocks (several per window) against the masked all-pairs reference, every layer kind."""
    model = tiny_v4()
    x = torch.randn(2, 37, model.cfg.dim)
    with torch.no_grad():
        for layer in model.layers:
            attn, table = layer.attn, model.table(layer.attn.kind)
            q_res, q, kv = attn.project(x, table[:37])
            comp, visible = attn.compressed(x, q_res, table)
            if attn.kind == "csa":
                assert (visible.sum(-1) <= model.cfg.index_topk).all() and (visible[:, -1].sum(-1) == 3).all()
            ref = attn(x, table, attn_impl="naive")
            for block in (3, 8, 64):
                o = attn.output(attn.attend_blocked(q, kv, comp, visible, block=block), table[:37])
                assert rel_err(o, ref) < 1e-5, (attn.kind, block)


# ----------------------------------------------------------------------------- cached decoding


def decode(model, tokens, chunks, cache, start=0, rows=None):
    """Feed tokens[:, start:] in the given chunk sizes; returns the logits of every fed position."""
    out, t = [], start
    for n in chunks:
        pos = torch.arange(t, t + n).expand(tokens.shape[0], n)
        out.append(model.head(model.hidden_cached(tokens[:, t:t + n], pos, cache.main)))
        t += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_decode_equals_full_forward(impl):
    """Prefill and decode in uneven chunks across window and block boundaries: the full forward's logits."""
    model = tiny_v4(attn_impl=impl)
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # 30 tokens: 3 windows, 7 CSA entries for a top-3, 3 HCA blocks
        full = model(tokens)
        got = decode(model, tokens, [5, 1, 1, 7, 2] + [1] * 14, model.new_cache(2, 64))
    assert rel_err(got, full) < 1e-5


def test_rows_decode_at_their_own_positions_and_slots_are_reused():
    model = tiny_v4()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 256, (1, 30), generator=g), torch.randint(0, 256, (1, 30), generator=g)
    cache = model.new_cache(2, 64)
    with torch.no_grad():
        decode(model, torch.cat([a, a]), [18], cache)  # both rows hold a[:18]
        got = []
        for t in range(12):  # row 0 continues a; row 1 starts b from position 0 in the same calls
            pos = torch.tensor([[18 + t], [t]])
            h = model.hidden_cached(torch.stack([a[0, 18 + t:19 + t], b[0, t:t + 1]]), pos, cache.main)
            got.append(model.head(h))
        got = torch.cat(got, dim=1)
        assert rel_err(got[0], model(a)[0, 18:]) < 1e-5 and rel_err(got[1], model(b)[0, :12]) < 1e-5


def test_rewind_within_capacity_is_exact_and_beyond_raises():
    model = tiny_v4()
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 256, (1, 30), generator=g)
    b = torch.cat([a[:, :22], torch.randint(0, 256, (1, 6), generator=g)], dim=1)  # shares 22 tokens
    with torch.no_grad():
        cache = model.new_cache(1, 64, rewind=4)
        decode(model, a, [26], cache)
        got = decode(model, b, [2, 1, 3], cache, start=22)  # 4 back: within `rewind`
        assert rel_err(got, model(b)[:, 22:]) < 1e-5
        cache = model.new_cache(1, 64, rewind=4)
        decode(model, a, [28], cache)
        with pytest.raises(ValueError, match="rewind"):
            decode(model, b, [1], cache, start=22)  # 6 back
        with pytest.raises(ValueError, match="consecutive"):
            model.hidden_cached(a[:, :2], torch.tensor([[0, 2]]), cache.main)


def test_cache_is_the_window_plus_compressed_entries():
    model = tiny_v4()
    cache = model.new_cache(1, 64, rewind=0)
    cfg = model.cfg
    window = cfg.window_size * cfg.head_dim
    csa = (64 // 4) * (cfg.head_dim + cfg.index_head_dim) + (2 * 4) * 2 * (2 * cfg.head_dim + 2 * cfg.index_head_dim)
    hca = (64 // 8) * cfg.head_dim + 8 * 2 * cfg.head_dim
    assert cache.nbytes() == 4 * (3 * window + csa + hca)  # fp32 entries, plus the open windows' inputs


# ----------------------------------------------------------------------------- FP8 and FP4 checkpoints


def test_fp8_export_with_ue8m0_scales_round_trips(tmp_path):
    model = tiny_v4(dim=160)
    save_hf(model, tmp_path, fp8=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert state["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert state["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert state["layers.2.ffn.experts.0.w1.weight"].dtype == torch.float8_e4m3fn
    assert state["layers.1.attn.compressor.wkv.weight"].dtype == torch.float32  # compressors stay unquantised
    assert state["layers.1.attn.indexer.weights_proj.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    back = load_hf(tmp_path)
    assert torch.equal(back.layers[1].attn.compressor.wkv.weight, model.layers[1].attn.compressor.wkv.weight)
    assert 0 < rel_err(back.layers[1].attn.wq_b.weight, model.layers[1].attn.wq_b.weight) < 0.13  # power-of-2 scales


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (M, N) -> int8 (M, N/2), element 2j in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)


def test_fp4_experts_dequantise_on_load(tmp_path):
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    codes = torch.randint(0, 16, (6, 64), generator=torch.Generator().manual_seed(4))
    scale = torch.tensor([[0.25, 2.0]]).expand(6, 2).contiguous()
    expect = values[codes % 8] * torch.where(codes >= 8, -1.0, 1.0) * scale.repeat_interleave(32, dim=1)
    torch.testing.assert_close(dequantize_fp4(pack_fp4(codes), scale.to(torch.float8_e8m0fnu)), expect)
    model = tiny_v4()
    save_hf(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    w = state["layers.2.ffn.experts.1.w3.weight"]  # (16, 64)
    c = torch.randint(0, 16, w.shape, generator=torch.Generator().manual_seed(5))
    state["layers.2.ffn.experts.1.w3.weight"] = pack_fp4(c)
    state["layers.2.ffn.experts.1.w3.scale"] = torch.full((w.shape[0], 2), 0.5).to(torch.float8_e8m0fnu)
    save_file(state, str(tmp_path / "model.safetensors"))
    back = load_hf(tmp_path)
    torch.testing.assert_close(back.layers[2].ffn.experts.w3[1], values[c % 8] * torch.where(c >= 8, -0.5, 0.5))


# ----------------------------------------------------------------------------- training and the CLI


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    r = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the big red house under the blue sky near the river".split()
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(60)) + "." for _ in range(200)))
    return path


def pretrain_tiny(preset: str, corpus, out, steps: int = 8, extra=()):
    from nanoseek.cli import main
    from nanoseek.stages.common import read_metrics

    args = ["pretrain", "--preset", preset, "--data", str(corpus), "--vocab-size", "300", "--steps", str(steps),
            "--batch-size", "4", "--seq-len", "32", "--save-every", str(steps), "--eval-every", str(steps // 2),
            "--eval-batches", "1", "--lr", "1e-2", "--out", str(out), "--precision", "fp32", *extra]
    assert main(args) == 0  # fp32 pinned: `auto` trains in bf16 on a CPU with native bf16
    return read_metrics(out / "metrics.jsonl")


def test_small_v4_pretrains_and_round_trips_through_the_cli(corpus, tmp_path):
    """The existing trainer trains V4 end to end (compressors, indexer, mHC, hash layers); its checkpoint
    exports to transformers' format and imports back to the same logits."""
    import nanoseek
    from nanoseek.cli import main

    rows = pretrain_tiny("tiny-v4", corpus, tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3 and "maxvio_layer1" in rows[-1] and "maxvio_layer0" not in rows[-1]
    model, _ = nanoseek.load(tmp_path / "run")
    assert isinstance(model, TransformerV4)
    assert model.layers[1].attn.compressor.wgate.weight.abs().max() > 0.05  # moved from its N(0, 0.006) init
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, _ = nanoseek.load(tmp_path / "back")
    tokens = tokens_for(model.cfg.vocab_size, 0, length=30)
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        assert rel_err(model(tokens), theirs(tokens).logits) <= TOL


def check_mtp_cached(model) -> None:
    """MTP depth 1 through the MTP layers' caches equals the full forward's MTP logits (V3.2 and V4)."""
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(2, 20, with_mtp=True)
    pos = torch.arange(20).expand(2, 20)
    with torch.no_grad():
        _, (ref,) = model(tokens, return_mtp=True)
        if isinstance(model, TransformerV4):  # V4's MTP reads and returns the residual streams
            x = model.streams_cached(tokens, pos, cache.main)
            _, hk = model.mtp_cached(1, x[:, :-1], tokens[:, 1:], pos[:, :-1], cache.mtp[0])
        else:
            h = model.hidden_cached(tokens, pos, cache.main)
            hk = model.mtp_cached(1, h[:, :-1], tokens[:, 1:], pos[:, :-1], cache.mtp[0])
    assert rel_err(model.head(hk), ref) < 1e-5


def test_mtp_cached_equals_full_mtp():
    check_mtp_cached(tiny_v4())


@pytest.mark.parametrize("preset", ["tiny-v4", "tiny-v32"])
def test_changing_a_token_never_changes_earlier_logits(preset, gemm_rows_independent):
    """Causality of the full forward (training path), MTP included: windows, compressed blocks and the indexer
    never look ahead. Earlier logits must stay bit for bit the same where this CPU's GEMM rows do not depend on
    how many rows are multiplied together (conftest.gemm_rows_independent); elsewhere the changed token can
    resize an expert's group, which moves that group's other rows in the last bits (measured: ≤ 1e-6 of the
    logits' scale), so they must stay within 1e-5 of it, far below what any look-ahead changes (checked below)."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset, max_seq_len=96, attn_impl="absorb")).eval()
    model.init_weights(std=0.1)
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(7))

    def same(a, b):
        return torch.equal(a, b) if gemm_rows_independent else bool((a - b).abs().max() <= 1e-5 * b.abs().max())

    with torch.no_grad():
        ref, (ref_mtp,) = model(tokens, return_mtp=True)
        for j in (5, 17, 40, 63):
            other = tokens.clone()
            other[0, j] = (other[0, j] + 1) % 256
            out, (mtp,) = model(other, return_mtp=True)
            assert same(out[:, :j], ref[:, :j])
            assert (out[:, j:] - ref[:, j:]).abs().max() > 1e-3 * ref.abs().max()  # the change itself shows
            assert same(mtp[:, : j - 1], ref_mtp[:, : j - 1])  # MTP position i reads token i + 1


def test_v4_trains_in_bf16_mixed_precision():
    """prepare_for_training keeps the embedding table fp32 and hands the blocks bf16 weights: V4's streams must
    start from rows cast to the compute dtype (this crashed with a dtype mismatch), and the bf16 loss must equal
    the fp32 one within bf16 rounding, with finite gradients."""
    from nanoseek.losses import lm_loss
    from nanoseek.runtime import prepare_for_training, resolve

    cfg = get_preset("tiny-v4")
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = lm_loss(model, x[:, :-1], x[:, 1:])[0]
    loss = lm_loss(prepare_for_training(model, resolve("cpu", "bf16")), x[:, :-1], x[:, 1:])[0]
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_v4_streams_stay_fp32_while_the_blocks_compute_in_bf16():
    """As V3's residual stream (docs/precision.md): under mixed precision, in training and in inference, the
    hyper-connection streams and their mixing weights stay fp32 (a bf16 stream rounds away updates below 2^-8 of
    its size), what attention and the MoE see is bf16, and the final norm hands the head bf16."""
    import copy

    from nanoseek.model_v4 import HyperConnection, HyperHead, MTPV4
    from nanoseek.runtime import MixedPrecision, prepare_inference, resolve

    cfg = get_preset("tiny-v4")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    inference = prepare_inference(copy.deepcopy(model), resolve("cpu", "bf16"))
    assert all(p.dtype == torch.float32 for m in inference.modules() if isinstance(m, (HyperConnection, HyperHead))
               for p in m.parameters())
    for forward, owner in ((MixedPrecision(model, torch.bfloat16), model), (inference, inference)):
        seen = []
        hooks = [owner.layers[1].register_forward_pre_hook(lambda m, a: seen.append(("streams", a[0].dtype))),
                 owner.layers[1].attn.register_forward_pre_hook(lambda m, a: seen.append(("attn", a[0].dtype))),
                 owner.layers[1].ffn.register_forward_pre_hook(lambda m, a: seen.append(("moe", a[0].dtype))),
                 owner.norm.register_forward_hook(lambda m, a, out: seen.append(("final", out.dtype))),
                 owner.mtp[0].register_forward_hook(lambda m, a, out: seen.append(("mtp streams", out[0].dtype)))]
        with torch.no_grad():
            forward(tokens, return_mtp=True)
        for h in hooks:
            h.remove()
        assert seen == [("streams", torch.float32), ("attn", torch.bfloat16), ("moe", torch.bfloat16),
                        ("final", torch.bfloat16), ("mtp streams", torch.float32)], seen
        assert isinstance(owner.mtp[0], MTPV4)
    with torch.no_grad():  # outside a mixed-precision model nothing changes
        assert model(tokens).dtype == torch.float32
