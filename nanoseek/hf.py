"""Hugging Face DeepSeek checkpoints (V2, V3, V3.2, V4), both ways.

`load_hf(dir)` reads a `deepseek_v3`, `deepseek_v32` or `deepseek_v2` directory (config.json plus single or sharded
safetensors, per-expert keys, FP8 weights with 128×128 `weight_scale_inv` blocks, the MTP layer
`model.layers.{n_layers}.*`) into a nanoseek Transformer, one shard at a time. `save_hf(model, dir)` writes
a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads, in DeepSeek's hub layout; given the
tokenizer, a complete one (`AutoTokenizer` with nanoseek's R1 chat template, `generate()` stopping at eos and
sampling as R1 is evaluated). V3.2 is V3's layout plus `self_attn.indexer.*`; V4's own layout and config live in
hf_v4.py.

Only the config translation, a key map and the tokenizer files live here; the model never mentions Hugging Face.
What differs between generations (config writer and reader, tensor names, FP8 scales, the MTP layers' layout) is
one `Layout` record per generation in `LAYOUTS`, keyed by `ModelConfig.family` like config.FAMILIES; the
functions here take it from there rather than testing the family.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, family_entry
from .errors import CheckpointError
from .fp8 import dequantize_weight, fp8_state
from .hf_v4 import (config_from_hf_v4, config_to_hf_v4, dequantize_fp4, fp8_v4_state, is_extra_v4_mtp,
                    normalize_v4_key, v4_key, v4_mtp_layers, v4_scale_key)
from .generations import build_model
from .model import MLA, Transformer
from .template import ANSWER, ASSISTANT, END_ANSWER, END_THINK, R1_SAMPLING, THINK, USER
from .tokenizer import Tokenizer


# ----------------------------------------------------------------------------- config translation


def _rope_from_hf(d: dict) -> dict:
    """HF rope settings (v5 `rope_parameters` or legacy `rope_theta` + `rope_scaling`) -> ModelConfig fields."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    max_pos = d.get("max_position_embeddings", 4096)
    if kind == "default":
        return dict(rope_theta=float(theta), rope_factor=1.0, original_seq_len=max_pos)
    if kind != "yarn":
        raise ValueError(f"unsupported rope type {kind!r} (nanoseek supports 'default' and 'yarn')")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("unsupported rope setting partial_rotary_factor != 1")
    original = rope.get("original_max_position_embeddings", d.get("original_max_position_embeddings", max_pos))
    factor = rope.get("factor") or max_pos / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    # HF scales cos/sin by `attention_factor` and the softmax by get_mscale(mscale_all_dim)²; DeepSeek's
    # configs set mscale == mscale_all_dim so that the first is exactly 1.
    attn_factor = rope.get("attention_factor")
    if attn_factor is None:
        attn_factor = get_mscale(mscale) / get_mscale(mscale_all_dim) if mscale and mscale_all_dim else get_mscale(1)
    return dict(rope_theta=float(theta), rope_factor=float(factor), original_seq_len=int(original),
                beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
                mscale=float(mscale_all_dim or 0.0), rope_attn_factor=float(attn_factor),
                rope_truncate=bool(rope.get("truncate", True)))


def config_from_hf(d: dict) -> ModelConfig:
    """A Hugging Face config.json dict (deepseek_v2, deepseek_v3, deepseek_v32 or deepseek_v4) -> ModelConfig."""
    model_type = d.get("model_type")
    readers = {t: layout.from_hf for layout in LAYOUTS.values() for t in layout.model_types}
    if model_type not in readers:
        raise ValueError(f"unsupported model_type {model_type!r}; nanoseek reads {', '.join(readers)}")
    return readers[model_type](d)


def _mla_fields(d: dict) -> dict:
    """ModelConfig fields of a deepseek_v2 / v3 / v32 config (MLA); V2 and V3 differ in their routing only."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (DeepSeek models use silu)")
    if d.get("mlp_bias"):
        raise ValueError("unsupported mlp_bias=true (DeepSeek models have no MLP biases)")
    n_heads = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, n_heads):
        raise ValueError("num_key_value_heads must equal num_attention_heads for MLA")
    fields = dict(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], inter_dim=d["intermediate_size"],
        moe_inter_dim=d.get("moe_intermediate_size", 1), n_layers=d["num_hidden_layers"],
        n_dense_layers=d.get("first_k_dense_replace") or 0, n_heads=n_heads,
        n_routed_experts=d.get("n_routed_experts") or 0, n_shared_experts=d.get("n_shared_experts") or 0,
        n_activated_experts=d.get("num_experts_per_tok") or 1, route_scale=float(d.get("routed_scaling_factor", 1.0)),
        q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        max_seq_len=d.get("max_position_embeddings", 4096), norm_eps=d.get("rms_norm_eps", 1e-6),
        attn_bias=bool(d.get("attention_bias", False)), **_rope_from_hf(d),
    )
    if d["model_type"] != "deepseek_v2":
        # transformers hard-codes V3 routing: sigmoid scores, groups scored by their top-2, always grouped
        fields.update(score_func="sigmoid", n_expert_groups=d.get("n_group") or 1,
                      n_limited_groups=d.get("topk_group") or 1, route_norm=bool(d.get("norm_topk_prob", True)),
                      n_mtp_layers=d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0)
    else:
        method = d.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"unsupported deepseek_v2 topk_method {method!r}")
        grouped = method == "group_limited_greedy"
        # transformers' V2 router never renormalises the top-k softmax weights
        fields.update(score_func="softmax", route_norm=False, n_expert_groups=d.get("n_group") or 1 if grouped else 1,
                      n_limited_groups=d.get("topk_group") or 1 if grouped else 1)
    return fields


def _config_from_hf_v3(d: dict) -> ModelConfig:
    return _mla_config(_mla_fields(d))


def _config_from_hf_v32(d: dict) -> ModelConfig:
    fields = _mla_fields(d)
    fields.update(n_dense_layers=_leading_dense(d), index_n_heads=d.get("index_n_heads", 64),
                  index_head_dim=d.get("index_head_dim", 128), index_topk=d.get("index_topk", 2048))
    return _mla_config(fields)


def _config_from_hf_v4(d: dict) -> ModelConfig:
    return config_from_hf_v4(d, _rope_from_hf(dict(d, rope_parameters=_v4_compress_rope(d))))


def _mla_config(fields: dict) -> ModelConfig:
    if fields["rope_factor"] == 1.0 and fields.get("rope_attn_factor", 1.0) != 1.0:
        raise ValueError("unsupported yarn rope_scaling with factor 1 and attention_factor != 1")
    if fields["n_routed_experts"] == 0:
        fields["n_dense_layers"] = fields["n_layers"]
    return ModelConfig(**fields)


def _leading_dense(d: dict) -> int:
    """deepseek_v32: the dense prefix, from `mlp_layer_types` (dense layers first, as the model requires) or
    first_k_dense_replace."""
    types = d.get("mlp_layer_types")
    if types is None:
        return min(d.get("first_k_dense_replace", 3) or 0, d["num_hidden_layers"])
    n = sum(t == "dense" for t in types)
    if list(types) != ["dense"] * n + ["sparse"] * (len(types) - n):
        raise ValueError(f"unsupported mlp_layer_types {types}: nanoseek needs the dense layers first")
    return n


def _v4_compress_rope(d: dict) -> dict:
    """deepseek_v4 keeps two RoPEs; the compressed layers' one (compress_rope_theta, YaRN) carries the scaling.

    transformers gives it no cos/sin attention factor unless one is set, and takes its base from
    compress_rope_theta unless the config already nests {main, compress}."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    nested = isinstance(rope.get("compress"), dict)
    rope = dict(rope["compress"] if nested else rope)
    rope.pop("partial_rotary_factor", None)  # the rotated slice is qk_rope_head_dim
    if not nested or "rope_theta" not in rope:
        rope["rope_theta"] = d.get("compress_rope_theta", 160000.0)
    if rope.get("rope_type", rope.get("type", "default")) == "yarn":
        rope.setdefault("attention_factor", 1.0)
    return rope


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """ModelConfig -> Hugging Face config.json dict: deepseek_v4 / deepseek_v32 for those generations, else
    deepseek_v3 for sigmoid routing and deepseek_v2 for softmax."""
    return _layout(cfg).to_hf(cfg, dtype)


def _config_to_hf_mla(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """deepseek_v3 (sigmoid routing) or deepseek_v2 (softmax)."""
    v3 = cfg.score_func == "sigmoid"
    if not v3 and cfg.normalize_topk:
        raise ValueError("deepseek_v2 cannot express renormalised softmax routing (route_norm=True)")
    d = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "routed_scaling_factor": cfg.route_scale,
        "first_k_dense_replace": cfg.n_dense_layers if cfg.n_moe_layers else cfg.n_layers,
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups,
        "norm_topk_prob": cfg.normalize_topk, "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": False, "attention_bias": cfg.attn_bias,
        "rope_theta": cfg.rope_theta, "rope_scaling": _rope_to_hf(cfg),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    # transformers hard-codes each family's routing, but vLLM and SGLang build the router from these fields (as
    # in DeepSeek's published configs): V2's softmax "greedy"/"group_limited_greedy", V3's sigmoid "noaux_tc",
    # which is what makes them load mlp.gate.e_score_correction_bias. moe_layer_freq: every layer past the prefix.
    if v3:
        d.update(rope_interleave=True, num_nextn_predict_layers=cfg.n_mtp_layers, scoring_func="sigmoid",
                 topk_method="noaux_tc", moe_layer_freq=1)
    else:
        d.update(scoring_func="softmax", topk_method="group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy",
                 moe_layer_freq=1)
    return d


def _config_to_hf_v32(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """deepseek_v3's config plus the indexer's fields."""
    d = _config_to_hf_mla(cfg, dtype)
    if cfg.score_func != "sigmoid":
        raise ValueError("deepseek_v32 routes with sigmoid scores: set score_func='sigmoid'")
    del d["rope_interleave"]  # V3.2's MLA RoPE is always interleaved (its indexer's never is)
    d.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", index_n_heads=cfg.index_n_heads,
             index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk)
    return d


def _config_to_hf_v4(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    return config_to_hf_v4(cfg, dtype, _rope_to_hf(cfg))


def _rope_to_hf(cfg: ModelConfig) -> dict | None:
    if not cfg.uses_yarn:
        if cfg.rope_attn_factor != 1.0:
            raise ValueError("HF default RoPE cannot express rope_attn_factor != 1 without YaRN")
        return None
    rope = {"type": "yarn", "factor": cfg.rope_factor, "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
            "mscale_all_dim": cfg.mscale}
    if cfg.rope_attn_factor != 1.0 or not cfg.mscale:
        rope["attention_factor"] = cfg.rope_attn_factor
    if not cfg.rope_truncate:
        rope["truncate"] = False
    return rope


# ----------------------------------------------------------------------------- key map

_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
         "indexer": "indexer"}  # V3.2's indexer keeps DeepSeek's names (wq_b, wk, k_norm, weights_proj)
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}


def _block_key(rest: str) -> str:
    """Our key inside a Block ('attn.wq_a.weight') -> HF key inside a decoder layer ('self_attn.q_a_proj.weight')."""
    part, _, tail = rest.partition(".")
    if part in _BLOCK:
        return f"{_BLOCK[part]}.{tail}"
    if part == "attn":
        mod, _, leaf = tail.partition(".")
        return f"self_attn.{_ATTN[mod]}.{leaf}"
    assert part == "ffn", rest
    mod, _, leaf = tail.partition(".")
    if mod in _MLP:  # dense FFN
        return f"mlp.{_MLP[mod]}.{leaf}"
    if mod == "gate":
        return "mlp.gate.weight" if leaf == "weight" else "mlp.gate.e_score_correction_bias"
    if mod == "shared_experts":
        w, _, leaf = leaf.partition(".")
        return f"mlp.shared_experts.{_MLP[w]}.{leaf}"
    assert mod == "experts", rest
    return f"mlp.experts.{{e}}.{_MLP[leaf]}.weight"  # one HF tensor per expert


def hf_key(name: str, n_layers: int) -> str:
    """Our state-dict key -> HF key; routed-expert keys keep an '{e}' placeholder for the expert index."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m.group(1)}.{_block_key(m.group(2))}"
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    assert m, name
    layer, rest = n_layers + int(m.group(1)), m.group(2)
    part, _, tail = rest.partition(".")
    if part == "block":
        return f"model.layers.{layer}.{_block_key(tail)}"
    return f"model.layers.{layer}.{_MTP[part]}.{tail}"


def checkpoint_key(name: str, cfg: ModelConfig) -> str:
    """Our state-dict key -> the checkpoint's (HF names for V2/V3/V3.2, DeepSeek's for V4); '{e}' = expert index."""
    return _layout(cfg).key(name, cfg)


def _scale_name(key: str, cfg: ModelConfig) -> str:
    """Where a quantized weight's scale lives: V4's `.scale` (UE8M0) or V3's `_scale_inv`."""
    return _layout(cfg).scale_key(key)


def _scale_inv_key(key: str) -> str:
    return key.removesuffix(".weight") + ".weight_scale_inv"


def export_state(model: Transformer, fp8: bool = False) -> dict[str, torch.Tensor]:
    """Our parameters under checkpoint names: experts split per expert, V3's MTP layers with their shared
    embedding/head. With fp8, every weight DeepSeek ships in FP8 is written as float8_e4m3fn plus its scale."""
    cfg, out = model.cfg, {}
    v3 = cfg.score_func == "sigmoid"
    quantized = _layout(cfg).fp8_state(model) if fp8 else {}
    quantized = {k: v for k, v in quantized.items() if not k.endswith("indexer.weights_proj.weight")}  # bf16 in V3.2
    for name, t in model.state_dict().items():
        key = checkpoint_key(name, cfg)
        if key.endswith("e_score_correction_bias"):
            if not v3:
                if t.abs().max() > 0:
                    raise ValueError("deepseek_v2 has no routing correction bias, but this model's is non-zero")
                continue
        per_expert = "{e}" in key
        for e, k in enumerate([key.format(e=e) for e in range(t.shape[0])] if per_expert else [key]):
            if name in quantized:
                q, scale = quantized[name][e] if per_expert else quantized[name]
                out[k], out[_scale_name(k, cfg)] = q, scale
            else:
                out[k] = (t[e] if per_expert else t).contiguous()
    for k in range(cfg.n_mtp_layers if _layout(cfg).repeats_mtp_shared else 0):  # V3's copies of shared tensors
        out[f"model.layers.{cfg.n_layers + k}.embed_tokens.weight"] = model.embed.weight.detach().clone()
        out[f"model.layers.{cfg.n_layers + k}.shared_head.head.weight"] = model.head.weight.detach().clone()
    return out


# ----------------------------------------------------------------------------- tokenizer and generation files


def special_token_ids(tok: Tokenizer) -> dict:
    """bos_token_id / eos_token_id, as DeepSeek's config.json and generation_config.json carry them."""
    return {k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)) if v is not None}


def generation_config(tok: Tokenizer | None = None) -> dict:
    """generation_config.json: `generate()`'s defaults (https://huggingface.co/docs/transformers/main_classes/text_generation).
    Sampling as R1 is evaluated (template.R1_SAMPLING: temperature 0.6, top-p 0.95, what `nanoseek eval` uses and
    DeepSeek-R1's own generation_config.json says); stopping at the tokenizer's eos."""
    d = {"do_sample": True, "temperature": R1_SAMPLING.temperature, "top_p": R1_SAMPLING.top_p}
    if tok is not None:
        d.update(special_token_ids(tok), pad_token_id=tok.pad_id)  # generate() pads finished rows of a batch
    return d


def tokenizer_config(tok: Tokenizer, max_len: int) -> dict:
    """tokenizer_config.json for transformers' fast tokenizer over tokenizer.json: the special tokens, nanoseek's
    R1 chat template, and tokenization as nanoseek does it (no bos/eos added, no space clean-up on decode)."""
    name = tok.tk.id_to_token
    d = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
         "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
         "model_max_length": max_len, "chat_template": chat_template()}
    if tok.bos_id is not None:
        d["bos_token"] = name(tok.bos_id)
    return d


def chat_template() -> str:
    """template.conversation as a Jinja chat template (https://huggingface.co/docs/transformers/chat_templating_writing):
    the same string for the same messages, and "\\nAssistant: <think>" under add_generation_prompt, as r1_prompt
    ends. Built from template.py's constants so the two cannot drift apart; Jinja's `trim` is Python's strip."""
    lit = json.dumps  # a JSON string literal is a valid Jinja one (\n, \" and \uXXXX escapes included)
    sep = "('\\n' if ns.body else '')"
    reply = f"{lit(ASSISTANT + f'{THINK} {END_THINK} {ANSWER} ')} + content + {lit(' ' + END_ANSWER)}"
    return "".join([
        "{%- set ns = namespace(system='', body='') -%}{%- for m in messages -%}",
        "{%- set content = m['content'] | string | trim -%}",
        "{%- if m['role'] == 'system' -%}{%- set ns.system = content -%}",  # the last one, as in conversation()
        f"{{%- elif m['role'] == 'user' -%}}{{%- set ns.body = ns.body + {sep} + {lit(USER)} + content -%}}",
        f"{{%- elif m['role'] == 'assistant' -%}}{{%- set ns.body = ns.body + {sep} + {reply} -%}}",
        "{%- else -%}{{ raise_exception('unknown message role ' + m['role'] + ' (system, user or assistant)') }}",
        "{%- endif -%}{%- endfor -%}",
        "{%- if ns.system -%}{{ ns.system + '\\n' }}{%- endif -%}{{ ns.body }}",
        "{%- if add_generation_prompt -%}{%- if not messages or messages[-1]['role'] != 'user' -%}",
        "{{ raise_exception('a conversation must end with a user message') }}{%- endif -%}",
        f"{{{{ '\\n' + {lit(ASSISTANT + THINK)} }}}}{{%- endif -%}}",
    ])


def _write_json(file: Path, d: dict) -> None:
    file.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- save


def save_hf(model: Transformer, path: str | Path, max_shard_bytes: int = 4 << 30, fp8: bool = False,
            tokenizer_file: str | Path | None = None) -> None:
    """Write config.json, generation_config.json and safetensors (sharded above max_shard_bytes) in DeepSeek's
    hub layout; with tokenizer_file (a tokenizer.json), also that file, tokenizer_config.json (special tokens and
    the R1 chat template) and the bos/eos ids in both configs.

    fp8=True writes DeepSeek-V3's FP8 checkpoint format (e4m3 weights, 128×128 weight_scale_inv blocks).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(tokenizer_file) if tokenizer_file is not None else None
    dtype = model.embed.weight.dtype
    hf_cfg = config_to_hf(model.cfg, dtype)
    if fp8:
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
        if _layout(model.cfg).fp8_scale_fmt:
            hf_cfg["quantization_config"]["scale_fmt"] = _layout(model.cfg).fp8_scale_fmt
    if tok is not None:
        hf_cfg.update(special_token_ids(tok))
        shutil.copyfile(tokenizer_file, path / "tokenizer.json")  # byte for byte: an imported one stays DeepSeek's
        _write_json(path / "tokenizer_config.json", tokenizer_config(tok, model.cfg.max_seq_len))
    _write_json(path / "generation_config.json", generation_config(tok))
    _write_json(path / "config.json", hf_cfg)
    state = export_state(model, fp8=fp8)
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = state[key], size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------- load


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _weight_map(path: Path) -> dict[str, Path]:
    """HF key -> the safetensors file holding it (from the index, or by reading single-file headers)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {k: path / f for k, f in _read_json(index).get("weight_map", {}).items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                out.update({k: f for k in sf.keys()})
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def _count_mtp_layers(keys, n_layers: int) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) >= n_layers}
    return len(found)


_IGNORED = re.compile(r".*rotary_emb\.inv_freq$|model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Read a Hugging Face deepseek_v2 / v3 / v32 / v4 checkpoint directory into a Transformer (in `dtype`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    hf_cfg = _read_json(path / "config.json")
    try:
        cfg = config_from_hf(hf_cfg)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: missing or malformed field {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    files = _weight_map(path)
    found = _layout(cfg).mtp_layers(files, cfg)
    cfg = cfg.replace(n_mtp_layers=min(cfg.n_mtp_layers, found))
    block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    if block[0] != block[1]:
        raise CheckpointError(f"{path / 'config.json'}: unsupported FP8 weight_block_size {list(block)}")
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.reset_buffers()  # RoPE tables and routing biases are not all in the checkpoint
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    _fill(model, files, block[0], path, tied=tied)
    if hf_cfg["model_type"] == "deepseek_v3" and hf_cfg.get("rope_interleave", True) is False:
        _interleave_rope_rows(model)
    return model


@torch.no_grad()
def _interleave_rope_rows(model: Transformer) -> None:
    """Reorder rope rows from HF's half-split layout (pairs j, j+R/2) to DeepSeek's interleaved (2j, 2j+1).

    Queries and keys are permuted alike, so every attention score, and hence every logit, is unchanged.
    """
    cfg = model.cfg
    R, P, C = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    perm = torch.arange(R).view(2, R // 2).t().flatten()  # [0, R/2, 1, R/2+1, ...]
    for attn in (m for m in model.modules() if isinstance(m, MLA)):
        wq = attn.wq if hasattr(attn, "wq") else attn.wq_b
        for t in (wq.weight, wq.bias):
            if t is not None:
                rows = t.view(cfg.n_heads, cfg.qk_head_dim, -1)[:, P:]  # (H, R, in) or (H, R, 1)
                rows.copy_(rows[:, perm].clone())
        for t in (attn.wkv_a.weight, attn.wkv_a.bias):
            if t is not None:
                t[C:] = t[C:][perm].clone()


def _fill(model: Transformer, files: dict[str, Path], block: int, root: Path, tied: bool = False) -> None:
    """Copy every checkpoint tensor into its parameter, one shard at a time; error on anything missing."""
    cfg = model.cfg
    targets: dict[str, tuple[torch.Tensor, int | None]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = checkpoint_key(name, cfg)
        if key.endswith("e_score_correction_bias") and cfg.score_func != "sigmoid":
            continue  # deepseek_v2 has no correction bias: ours stays zero
        if "{e}" in key:
            targets.update({key.format(e=e): (t, e) for e in range(t.shape[0])})
        else:
            targets[key] = (t, None)
    missing = set(targets)
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        by_file.setdefault(f, []).append(key)
    for f in sorted(by_file):
        with safe_open(str(f), framework="pt") as sf:
            for raw in by_file[f]:
                key = _layout(cfg).normalize_key(raw)
                if _skipped(key, cfg):
                    continue
                if key not in targets:
                    if sf.get_slice(raw).get_shape().count(0):
                        continue  # transformers' zero-width shared expert when n_shared_experts = 0
                    raise CheckpointError(f"{f.name}: unexpected tensor {raw}")
                tensor = sf.get_tensor(raw)
                if tensor.element_size() == 1 and tensor.is_floating_point():
                    tensor = dequantize_weight(tensor, _scale_inv(raw, files, cfg), block=block)
                elif tensor.dtype == torch.int8:  # V4's FP4 experts, two per byte
                    tensor = dequantize_fp4(tensor, _scale_inv(raw, files, cfg))
                dest, e = targets[key]
                want = dest.shape if e is None else dest.shape[1:]
                if tuple(tensor.shape) != tuple(want):
                    raise CheckpointError(f"{f.name}: tensor {key} has shape {tuple(tensor.shape)}, "
                                          f"the config implies {tuple(want)}")
                with torch.no_grad():
                    (dest if e is None else dest[e]).copy_(tensor)
                missing.discard(key)
    if tied and missing == {"lm_head.weight"}:  # tie_word_embeddings: the head is the embedding (copied, untied)
        with torch.no_grad():
            model.head.weight.copy_(model.embed.weight)
        missing.clear()
    if missing:
        raise CheckpointError(f"{root}: missing tensor {sorted(missing)[0]} (and {len(missing) - 1} more)"
                              if len(missing) > 1 else f"{root}: missing tensor {next(iter(missing))}")


def _skipped(key: str, cfg: ModelConfig) -> bool:
    """Scales (read with their weights), RoPE caches, V3's repeated MTP tensors and MTP layers beyond the ones
    we load are skipped rather than rejected."""
    if key.endswith("_scale_inv") or _IGNORED.fullmatch(key):
        return True
    return _layout(cfg).skips(key, cfg)


def _beyond_mtp(key: str, cfg: ModelConfig) -> bool:
    """V3's layout: a decoder layer past the main ones and the MTP layers we load."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= cfg.n_layers + cfg.n_mtp_layers


def _scale_inv(key: str, files: dict[str, Path], cfg: ModelConfig) -> torch.Tensor:
    skey = _scale_name(key, cfg)
    if skey not in files:
        raise CheckpointError(f"FP8 tensor {key} has no {skey}")
    with safe_open(str(files[skey]), framework="pt") as sf:
        return sf.get_tensor(skey)


# ----------------------------------------------------------------------------- per generation


@dataclass(frozen=True)
class Layout:
    """One generation's Hugging Face checkpoint: its config.json and the names and formats of its tensors."""

    model_types: tuple[str, ...]  # the config.json model_type values read as this generation
    from_hf: Callable[[dict], ModelConfig]
    to_hf: Callable[[ModelConfig, torch.dtype], dict]
    key: Callable[[str, ModelConfig], str]  # our state-dict key -> checkpoint key ('{e}' = expert index)
    normalize_key: Callable[[str], str]  # a key as stored -> the form `key` gives (V4 ships two spellings)
    scale_key: Callable[[str], str]  # an FP8 weight's key -> its scale's key
    fp8_state: Callable  # model -> {our name: (fp8 weight, scale)} for the weights DeepSeek ships in FP8
    fp8_scale_fmt: str | None  # quantization_config.scale_fmt (V4: ue8m0, power-of-two scales)
    repeats_mtp_shared: bool  # every MTP layer repeats the shared embedding and head (DeepSeek's V3 layout)
    mtp_layers: Callable  # (checkpoint keys, cfg) -> how many MTP layers the checkpoint holds
    skips: Callable[[str, ModelConfig], bool]  # stored tensors the loader reads past: extra MTP layers, scales


_V3_TENSORS = dict(key=lambda name, cfg: hf_key(name, cfg.n_layers), normalize_key=lambda key: key,
                   scale_key=_scale_inv_key, fp8_state=fp8_state, fp8_scale_fmt=None, repeats_mtp_shared=True,
                   mtp_layers=lambda keys, cfg: _count_mtp_layers(keys, cfg.n_layers), skips=_beyond_mtp)
# Keyed like config.FAMILIES. V3.2 is V3's layout plus `self_attn.indexer.*` (which _ATTN maps by name).
LAYOUTS: dict[str, Layout] = {
    "v3": Layout(("deepseek_v3", "deepseek_v2"), _config_from_hf_v3, _config_to_hf_mla, **_V3_TENSORS),
    "v32": Layout(("deepseek_v32",), _config_from_hf_v32, _config_to_hf_v32, **_V3_TENSORS),
    "v4": Layout(("deepseek_v4",), _config_from_hf_v4, _config_to_hf_v4, key=lambda name, cfg: v4_key(name),
                 normalize_key=normalize_v4_key, scale_key=v4_scale_key, fp8_state=fp8_v4_state, fp8_scale_fmt="ue8m0",
                 repeats_mtp_shared=False, mtp_layers=lambda keys, cfg: v4_mtp_layers(keys),
                 skips=lambda key, cfg: key.endswith(".scale") or is_extra_v4_mtp(key, cfg.n_mtp_layers)),
}


def _layout(cfg: ModelConfig) -> Layout:
    return family_entry(LAYOUTS, cfg.family, "hf.LAYOUTS")
