"""Checkpoint interop details: sharding, FP8 weights, the MTP layer, config translation, and bad input."""

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import CheckpointError, save_model
from nanoseek.cli import main
from nanoseek.engine import Engine, SamplingParams
from nanoseek.evaluation import evaluate
from nanoseek.fp8 import dequantize_weight, quantize_weight
from nanoseek.hf import config_from_hf, config_to_hf, load_hf, save_hf
from nanoseek.template import conversation, r1_completion, r1_prompt
from nanoseek.tokenizer import BOS, EOS, PAD, Tokenizer

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


# ----------------------------------------------------------------------------- routing fields and complete exports

ROUTING_PRESETS = ["tiny", "small", "deepseek-v3", "deepseek-v2-lite", "deepseek-v2", "tiny-v32", "deepseek-v3.2",
                   "tiny-v4", "deepseek-v4-flash"]


@pytest.mark.parametrize("name", ROUTING_PRESETS)
def test_config_routing_fields_match_the_model_config(name):
    """vLLM and SGLang build the router from these fields (transformers hard-codes each family's), so each must say
    what the model does: a V3 declaring V2's softmax routing fails to load there (no e_score_correction_bias)."""
    cfg = get_preset(name)
    d = config_to_hf(cfg)
    # DeepSeek's published configs: V2 softmax "greedy" / "group_limited_greedy", V3 / V3.2 sigmoid and V4
    # sqrtsoftplus "noaux_tc" (top-k on scores plus the correction bias)
    method = ("group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy") if cfg.score_func == "softmax" \
        else "noaux_tc"
    assert (d["scoring_func"], d["topk_method"]) == (cfg.score_func, method)
    assert d.get("n_group", 1) == cfg.n_expert_groups and d.get("topk_group", 1) == cfg.n_limited_groups
    assert d["norm_topk_prob"] == cfg.normalize_topk and d["routed_scaling_factor"] == cfg.route_scale
    assert (d["n_routed_experts"], d["num_experts_per_tok"], d["n_shared_experts"]) == (
        cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_shared_experts)
    assert d.get("first_k_dense_replace", 0) == cfg.n_dense_layers and d.get("moe_layer_freq", 1) == 1
    if "num_nextn_predict_layers" in d:
        assert d["num_nextn_predict_layers"] == cfg.n_mtp_layers


Q = "What is 3 + 4?"
DOC = r1_prompt(Q) + r1_completion("3 + 4 = 7.", "7")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model that has memorised one R1 document (so greedy decoding reaches eos), its tokenizer, and the
    Hugging Face directory `nanoseek export` wrote from its checkpoint."""
    root = tmp_path_factory.mktemp("export")
    tok = Tokenizer.train([DOC, r1_prompt("What is 2 + 5?") + r1_completion("2 + 5 = 7.", "7")] * 20, 300)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights()
    ids = torch.tensor([tok.encode(DOC, eos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_model(model, root / "ckpt", tokenizer_file=root / "tokenizer.json")
    assert main(["export", "--ckpt", str(root / "ckpt"), "--to", "hf", str(root / "hf")]) == 0
    return model, tok, root / "hf"


def test_export_writes_token_ids_and_r1_sampling_defaults(exported):
    _, tok, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_id, tok.eos_id) == (0, 1)
    gen = transformers.GenerationConfig.from_pretrained(out)
    defaults = inspect.signature(evaluate).parameters  # the one place nanoseek keeps R1's evaluation sampling
    assert (gen.temperature, gen.top_p) == (defaults["temperature"].default, defaults["top_p"].default) == (0.6, 0.95)
    assert gen.do_sample and (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 1, tok.pad_id)


def test_exported_tokenizer_renders_the_r1_prompt(exported):
    _, tok, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token) == (EOS, BOS, PAD)
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id) == (tok.eos_id, tok.bos_id)
    chat = [{"role": "user", "content": f"  {Q} "}]
    text = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == r1_prompt(Q) == conversation(chat)
    ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == hf_tok(text)["input_ids"] == tok.encode(r1_prompt(Q))
    multi = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "7"}, {"role": "user", "content": 'say "é"\nagain'}]
    assert hf_tok.apply_chat_template(multi, add_generation_prompt=True, tokenize=False) == conversation(multi)
    assert hf_tok.decode(tok.encode(DOC)) == tok.decode(tok.encode(DOC))


def test_exported_model_generates_like_the_engine(exported):
    """Greedy transformers generate() on the chat template's ids, with only what the export wrote (eos from
    generation_config.json), stops at eos with exactly the engine's tokens."""
    model, tok, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": Q}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    ours = Engine(model, tok).generate([r1_prompt(Q)], SamplingParams(temperature=0, max_new_tokens=40))[0]
    with torch.no_grad():
        theirs = hf.generate(prompt, do_sample=False, max_new_tokens=40)[0, prompt.shape[1]:].tolist()
    assert ours.finish_reason == "eos" and theirs[-1] == tok.eos_id and len(theirs) < 40
    assert theirs == ours.tokens


def test_transformers_ignores_only_the_mtp_layer(exported):
    """The load report's UNEXPECTED table is the MTP layer alone: transformers' DeepseekV3 silences only
    `model.layers.61.*`, DeepSeek-V3's depth (docs/checkpoints.md)."""
    model, _, out = exported
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and info["unexpected_keys"]
    assert all(k.startswith(f"model.layers.{model.cfg.n_layers}.") for k in info["unexpected_keys"])
