"""nanoseek checkpoint -> one GGUF file that llama.cpp loads as its `deepseek2` architecture (DeepSeek-V2/V3).

The layout is the one llama.cpp's own converter (convert_hf_to_gguf.py, DeepseekV2Model) writes for a Hugging
Face DeepSeek-V3 directory, so a model trained here runs in llama.cpp, Ollama or LM Studio:
- MLA in its absorbed form: the KV up-projection W^{UKV} is split per head into attn_k_b (transposed: it maps a
  query's no-RoPE part into the latent) and attn_v_b; the cache is the C-wide latent plus the rotated key,
  stored as one key/value head (head_count_kv = 1, key_length = C + R, value_length = C);
- RoPE dims stay interleaved (DeepSeek's own order; llama.cpp's "normal" RoPE rotates adjacent pairs);
- routed experts stacked per layer (ffn_{gate,up,down}_exps), the routing correction bias as exp_probs_b,
  sigmoid or softmax gating, group-limited routing (group score = sum of a group's top-2 scores, V3's rule);
- the byte-level BPE tokenizer as llama.cpp's "gpt2" model with the GPT-2 pre-tokenizer, which is what
  tokenizer.py trains (ByteLevel with its regex); special tokens as control tokens; the R1 chat template.
The MTP module is not written: llama.cpp's deepseek2 runs the main model only (as its converter drops it).

What llama.cpp cannot run is refused with a one-line reason (`unsupported`): V3.2's indexer and V4's
compressed attention, V2's softmax group routing (its group score is a group's max, llama.cpp always sums the
top two), attention biases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .hf import chat_template, config_to_hf
from .model import Transformer

# tensor names of llama.cpp's deepseek2 (gguf-py's TENSOR_NAMES); ours on the left, '{i}' = block index
_GLOBAL = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "head.weight": "output.weight"}
_BLOCK = {
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn.wq.weight": "attn_q.weight", "attn.wq_a.weight": "attn_q_a.weight", "attn.q_norm.weight": "attn_q_a_norm.weight",
    "attn.wq_b.weight": "attn_q_b.weight", "attn.wkv_a.weight": "attn_kv_a_mqa.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight", "attn.wo.weight": "attn_output.weight",
    "ffn.w1.weight": "ffn_gate.weight", "ffn.w2.weight": "ffn_down.weight", "ffn.w3.weight": "ffn_up.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight", "ffn.gate.bias": "exp_probs_b.bias",
    "ffn.experts.w1": "ffn_gate_exps.weight", "ffn.experts.w2": "ffn_down_exps.weight",
    "ffn.experts.w3": "ffn_up_exps.weight",
    "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight", "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight",
    "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight",
}


def unsupported(cfg: ModelConfig) -> str | None:
    """Why llama.cpp's deepseek2 cannot run this model faithfully, or None."""
    if cfg.family != "v3":
        return f"a {cfg.family} model: llama.cpp's deepseek2 runs DeepSeek-V2/V3 attention only"
    if cfg.attn_bias:
        return "attention biases: llama.cpp's deepseek2 has none"
    if cfg.score_func == "softmax" and cfg.n_limited_groups < cfg.n_expert_groups:
        return "softmax routing limited to groups: V2 scores a group by its best expert, llama.cpp by its top two"
    if cfg.swiglu_limit:
        return "a clamped SwiGLU: llama.cpp's deepseek2 has no clamp"
    return None


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """GGUF name -> fp32 tensor in torch's (out, in) order, which the writer stores as llama.cpp's {in, out}."""
    cfg, out = model.cfg, {}
    H, P, V = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name.startswith("mtp."):
            continue
        if name in _GLOBAL:
            out[_GLOBAL[name]] = t
            continue
        _, i, rest = name.split(".", 2)
        if rest == "attn.wkv_b.weight":  # (H·(P+V), C): per head P rows of W^{UK}, then V rows of W^{UV}
            kv = t.view(H, P + V, -1)
            out[f"blk.{i}.attn_k_b.weight"] = kv[:, :P].transpose(1, 2).contiguous()  # (H, C, P)
            out[f"blk.{i}.attn_v_b.weight"] = kv[:, P:].contiguous()  # (H, V, C)
        else:
            out[f"blk.{i}.{_BLOCK[rest]}"] = t
    if "output.weight" not in out:
        out["output.weight"] = out["token_embd.weight"]
    return out


def _tokenizer(writer, tokenizer_file: Path, vocab_size: int) -> None:
    """The byte-level BPE as llama.cpp's gpt2 tokenizer: tokens by id (unused ids padded), merges, types, ids."""
    import gguf

    from .tokenizer import Tokenizer

    spec = json.loads(Path(tokenizer_file).read_text())
    if spec["model"]["type"] != "BPE" or spec.get("pre_tokenizer", {}).get("type") != "ByteLevel":
        raise ValueError("only nanoseek's byte-level BPE tokenizer can be written (the GPT-2 pre-tokenizer)")
    tok = Tokenizer.load(tokenizer_file)
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        if i >= vocab_size:
            raise ValueError(f"tokenizer id {i} beyond the model's vocabulary of {vocab_size}")
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 regex (byte-level BPE's own)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tok.eos_id)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)  # nanoseek's prompts carry no bos (hf.tokenizer_config says the same)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template())


def _hparams(writer, cfg: ModelConfig) -> None:
    import gguf

    hf = config_to_hf(cfg)
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.inter_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(1)  # MLA as one latent key/value head
    writer.add_key_length(C + R)
    writer.add_value_length(C)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + R)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_kv_lora_rank(C)
    writer.add_q_lora_rank(cfg.q_lora_rank)  # 0: a full query projection (llama.cpp requires the key either way)
    writer.add_rope_dimension_count(R)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_leading_dense_block_count(hf["first_k_dense_replace"])
    moe = cfg.n_routed_experts > 0
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.n_activated_experts if moe else 0)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_feed_forward_length(cfg.moe_inter_dim if moe else cfg.inter_dim)  # read even when dense
    writer.add_expert_weights_scale(cfg.route_scale)
    writer.add_expert_weights_norm(cfg.normalize_topk)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType[cfg.score_func.upper()])  # SOFTMAX or SIGMOID
    writer.add_expert_group_count(cfg.n_expert_groups)
    writer.add_expert_group_used_count(cfg.n_limited_groups)
    rope = hf.get("rope_scaling")
    if rope:  # YaRN, as the converter writes it (llama.cpp divides the log multiplier by 0.1 again)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32)))
        writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1)))
        if rope.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def save_gguf(model: Transformer, path: str | Path, tokenizer_file: str | Path | None, name: str = "nanoseek") -> None:
    """Write the model (fp32 tensors) and its tokenizer as one GGUF file; ValueError where llama.cpp cannot run it."""
    import gguf

    cfg = model.cfg
    why = unsupported(cfg)
    if why:
        raise ValueError(f"cannot write GGUF: {why}")
    if tokenizer_file is None:
        raise ValueError("cannot write GGUF without the checkpoint's tokenizer.json (llama.cpp needs the vocabulary)")
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _hparams(writer, cfg)
    _tokenizer(writer, Path(tokenizer_file), cfg.vocab_size)
    for key, t in gguf_tensors(model).items():
        writer.add_tensor(key, np.ascontiguousarray(t.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
