"""Logit parity with transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM, both conversion directions.

Named configurations cover the cases the DeepSeek models use; seeded random configurations cover the rest of
what transformers accepts (q compression on/off, expert groups, shared experts 0-2, dense prefixes, YaRN
variants past the original context, attention biases, tied embeddings, non-interleaved RoPE weights).
"""

import random

import pytest
import torch

from nanoseek import Transformer
from nanoseek.hf import config_from_hf, load_hf, save_hf
from tests.hf_configs import build_hf_config, random_hf_config

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # max |ours - theirs| / max |theirs|, fp32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def randomize_extras(model: torch.nn.Module, seed: int, routing_bias: bool = True) -> None:
    """Norm weights away from 1, biases and the routing correction bias away from 0 (both libraries' names)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if routing_bias and (name.endswith("e_score_correction_bias") or name.endswith("gate.bias")):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def hf_model(d: dict, seed: int):
    cfg = build_hf_config(d)
    torch.manual_seed(seed)
    cls = transformers.DeepseekV3ForCausalLM if d["model_type"] == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    model = cls(cfg).eval()
    randomize_extras(model, seed)
    return model


def tokens_for(vocab: int, seed: int, length: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def check_hf_to_ours(d: dict, seed: int, tmp_path) -> None:
    theirs = hf_model(d, seed)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    tokens = tokens_for(d["vocab_size"], seed)
    with torch.no_grad():
        ref = theirs(tokens).logits
        assert rel_err(ours(tokens), ref) <= TOL
        absorb = Transformer(ours.cfg.replace(attn_impl="absorb"))
        absorb.load_state_dict(ours.state_dict())
        assert rel_err(absorb(tokens), ref) <= TOL


def check_ours_to_hf(d: dict, seed: int, tmp_path) -> None:
    cfg = config_from_hf(d)
    torch.manual_seed(seed)
    ours = Transformer(cfg.replace(n_mtp_layers=1)).eval()
    ours.init_weights(std=0.1)
    randomize_extras(ours, seed, routing_bias=cfg.score_func == "sigmoid")  # V2 has no correction bias
    save_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = tokens_for(cfg.vocab_size, seed)
    with torch.no_grad():
        assert rel_err(ours(tokens), theirs(tokens).logits) <= TOL


V3_GROUPED_YARN = dict(  # V3 routing: sigmoid, 4 groups keep 2, correction bias; YaRN factor 40 past 16 tokens
    model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
    num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, max_position_embeddings=64, initializer_range=0.1,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1},
)
V2_LITE = dict(  # no query compression, greedy softmax routing, 2 shared experts, V2's mscale 0.707
    model_type="deepseek_v2", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
    num_experts_per_tok=3, topk_method="greedy", routed_scaling_factor=1.0, first_k_dense_replace=1,
    q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=64, initializer_range=0.1,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1},
)
V2_GROUPED = dict(V2_LITE, q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=3,
                  topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0)
NAMED = {"v3-grouped-sigmoid-yarn": V3_GROUPED_YARN, "v2-lite-no-q-lora": V2_LITE, "v2-grouped-softmax": V2_GROUPED}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_configs_hf_to_ours(name, tmp_path):
    check_hf_to_ours(NAMED[name], seed=7, tmp_path=tmp_path)


@pytest.mark.parametrize("name", list(NAMED))
def test_named_configs_ours_to_hf(name, tmp_path):
    check_ours_to_hf(NAMED[name], seed=7, tmp_path=tmp_path)


CASES = [(family, i) for family in ("deepseek_v3", "deepseek_v2") for i in range(8)]


@pytest.mark.parametrize("family,case", CASES)
def test_random_configs_hf_to_ours(family, case, tmp_path):
    rng = random.Random(1000 * (family == "deepseek_v3") + case)
    check_hf_to_ours(random_hf_config(rng, family), seed=case, tmp_path=tmp_path)


@pytest.mark.parametrize("family,case", CASES)
def test_random_configs_ours_to_hf(family, case, tmp_path):
    rng = random.Random(2000 + 1000 * (family == "deepseek_v3") + case)
    check_ours_to_hf(random_hf_config(rng, family), seed=case, tmp_path=tmp_path)


def _fused_mtp_state(ours: Transformer) -> dict:
    """Our MTP module's weights under transformers' MtpModel names (experts fused as in its memory layout)."""
    out = {}
    for name, t in ours.mtp[0].state_dict().items():
        name = name.replace("block.", "mtp_block.").replace("norm.weight", "norm.weight")
        out[name] = t
    return out


def test_mtp_matches_transformers_mtp_layer(tmp_path):
    """Our MTP logits equal transformers' MtpModel (enorm/hnorm/eh_proj/decoder layer/post norm, shared head)."""
    from transformers.modeling_layers import MtpModel

    d = dict(V3_GROUPED_YARN, num_nextn_predict_layers=1)
    cfg = config_from_hf(d)
    torch.manual_seed(3)
    ours = Transformer(cfg.replace(n_mtp_layers=1)).eval()
    ours.init_weights(std=0.1)
    randomize_extras(ours, 3)
    save_hf(ours, tmp_path)
    main = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    mtp = MtpModel(main, 1).eval()
    prefix = f"model.layers.{cfg.n_layers}."
    from safetensors.torch import load_file

    disk = {k[len(prefix):]: v for k, v in load_file(str(tmp_path / "model.safetensors")).items() if k.startswith(prefix)}
    state = {}
    for k, v in disk.items():
        k = k.replace("shared_head.norm", "post_norm")
        if k.startswith(("enorm", "hnorm", "eh_proj", "post_norm")):
            state[f"layers.0.{k}"] = v
        elif not k.startswith(("embed_tokens", "shared_head.head", "mlp.experts.")):
            state[f"layers.0.mtp_block.{k}"] = v
    E = cfg.n_routed_experts
    state["layers.0.mtp_block.mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([disk[f"mlp.experts.{e}.gate_proj.weight"], disk[f"mlp.experts.{e}.up_proj.weight"]]) for e in range(E)])
    state["layers.0.mtp_block.mlp.experts.down_proj"] = torch.stack(
        [disk[f"mlp.experts.{e}.down_proj.weight"] for e in range(E)])
    missing, unexpected = mtp.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("embed_tokens", "shared_head")) for k in missing)
    tokens = tokens_for(cfg.vocab_size, 3)
    T = tokens.shape[1]
    with torch.no_grad():
        h_main = main.model(tokens).last_hidden_state  # transformers feeds the post-norm hidden states
        h = mtp.forward_layer(0, h_main[:, :-1], position_ids=torch.arange(1, T)[None], mtp_cache=None,
                              input_ids=tokens[:, 1:])
        ref = mtp._project_to_logits(h)
        _, (ours_mtp,) = ours(tokens, return_mtp=True)
    assert ours_mtp.shape == (2, T - 1, cfg.vocab_size)
    assert rel_err(ours_mtp, ref) <= TOL
