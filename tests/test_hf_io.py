"""Checkpoint interop details: sharding, FP8 weights, the MTP layer, config translation, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import CheckpointError
from nanoseek.fp8 import dequantize_weight, quantize_weight
from nanoseek.hf import config_from_hf, config_to_hf, load_hf, save_hf

transformers = pytest.importorskip("transformers")


def random_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", **kw)).eval()
    model.init_weights(std=0.1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "score_func") and m.score_func == "sigmoid":
                m.bias.normal_(0, 0.1)
    return model


def tokens(n=24):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(0))


def test_sharded_roundtrip_and_transformers_load(tmp_path):
    model = random_tiny()
    save_hf(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = load_hf(tmp_path)
    assert back.cfg == model.cfg.replace(route_norm=True)  # route_norm None is spelled out in HF's config
    with torch.no_grad():
        assert torch.equal(back(tokens()), model(tokens()))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        ref = hf(tokens()).logits
    assert ((ref - model(tokens())).abs().max() / ref.abs().max()).item() < 1e-5


def test_mtp_layer_roundtrip_and_layout(tmp_path):
    model = random_tiny()
    save_hf(model, tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    L = model.cfg.n_layers
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight", "mlp.experts.0.gate_proj.weight",
              "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{k}" in keys
    back = load_hf(tmp_path)
    assert back.cfg.n_mtp_layers == 1
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_checkpoint_without_mtp_weights_loads_without_mtp(tmp_path):
    model = random_tiny(n_mtp_layers=0)
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1  # like transformers' own save_pretrained: config says 1, no weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_hf(tmp_path).cfg.n_mtp_layers == 0


def _quantize_checkpoint(src, dst):
    """Rewrite an exported checkpoint the way DeepSeek ships V3: every projection FP8 + weight_scale_inv."""
    state = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in state.items():
        if v.dim() == 2 and k.endswith("proj.weight"):
            q, s = quantize_weight(v)
            out[k], out[k.removesuffix("weight") + "weight_scale_inv"] = q, s
        else:
            out[k] = v
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return out


def test_fp8_checkpoint_is_dequantised_on_load(tmp_path):
    model = random_tiny(dim=160, inter_dim=192)  # 160 and 192 are not multiples of 128: partial edge blocks
    save_hf(model, tmp_path / "bf")
    fp8 = _quantize_checkpoint(tmp_path / "bf", tmp_path / "fp8")
    back = load_hf(tmp_path / "fp8")
    w = back.layers[0].ffn.w1.weight
    key = "model.layers.0.mlp.gate_proj.weight"
    assert fp8[key].dtype == torch.float8_e4m3fn and fp8[key.replace("weight", "weight_scale_inv")].shape == (2, 2)
    assert torch.equal(w, dequantize_weight(fp8[key], fp8[key.replace("weight", "weight_scale_inv")]))
    assert torch.equal(back.head.weight, model.head.weight)  # the head is never FP8
    err = (w - model.layers[0].ffn.w1.weight).abs().max() / model.layers[0].ffn.w1.weight.abs().max()
    assert 0 < err < 0.07  # e4m3 keeps 3 mantissa bits


def test_fp8_weight_without_scale_is_an_error(tmp_path):
    model = random_tiny()
    save_hf(model, tmp_path / "bf")
    fp8 = _quantize_checkpoint(tmp_path / "bf", tmp_path / "fp8")
    fp8.pop("model.layers.0.self_attn.o_proj.weight_scale_inv")
    save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="o_proj.weight_scale_inv"):
        load_hf(tmp_path / "fp8")


def test_quantize_dequantize_blocks():
    w = torch.randn(300, 200)
    w[:128, :128] *= 100  # one block with a much larger range: its own scale
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    torch.testing.assert_close(s[0, 0], w[:128, :128].abs().max() / 448)
    back = dequantize_weight(q, s)
    assert ((back - w).abs() <= w.abs() * 0.0625 + 1e-3 * s.max()).all()
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_weight(torch.tensor([[float("inf"), 1.0]]))


def test_tied_embeddings_checkpoint(tmp_path):
    cfg = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=8,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8,
                                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                        tie_word_embeddings=True)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    ours = load_hf(tmp_path)
    assert torch.equal(ours.head.weight, ours.embed.weight)
    t = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(t), hf(t).logits, rtol=1e-5, atol=1e-6)


V3_HUB_CONFIG = {  # DeepSeek-V3's published config.json (config.json of deepseek-ai/DeepSeek-V3 on the Hugging Face hub)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_v3_hub_config_is_the_v3_preset():
    cfg = config_from_hf(V3_HUB_CONFIG)
    assert cfg == get_preset("deepseek-v3", max_seq_len=163840, route_norm=True)
    assert abs(cfg.softmax_scale - 0.1352338) < 1e-6


@pytest.mark.parametrize("name", ["tiny", "small", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"])
def test_config_roundtrip(name):
    cfg = get_preset(name)
    back = config_from_hf(config_to_hf(cfg))
    if cfg.score_func == "softmax":  # deepseek_v2 has no MTP field
        cfg = cfg.replace(n_mtp_layers=0)
    assert back == cfg.replace(route_norm=cfg.normalize_topk, attn_impl="naive")  # attn_impl is ours alone


def test_transformers_accepts_exported_configs():
    for name in ("deepseek-v2-lite", "deepseek-v2", "deepseek-v3"):
        d = config_to_hf(get_preset(name))
        cls = transformers.DeepseekV3Config if d["model_type"] == "deepseek_v3" else transformers.DeepseekV2Config
        hf = cls(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
        assert hf.hidden_size == get_preset(name).dim


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
])
def test_unsupported_configs_are_named(change, match, tmp_path):
    save_hf(random_tiny(), tmp_path)
    cfg = {**json.loads((tmp_path / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_hf(tmp_path)


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_hf(tmp_path / "empty")


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_hf(random_tiny(), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.kv_b_proj.weight has shape \(3, 3\)"):
        load_hf(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    save_hf(random_tiny(), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    bad = dict(state)
    bad.pop("model.layers.2.mlp.experts.5.down_proj.weight")
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2.mlp.experts.5.down_proj.weight"):
        load_hf(tmp_path)
    bad = dict(state, **{"model.layers.0.self_attn.surprise.weight": torch.zeros(2)})
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.self_attn.surprise.weight"):
        load_hf(tmp_path)


def test_corrupt_safetensors(tmp_path):
    save_hf(random_tiny(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(tmp_path)
