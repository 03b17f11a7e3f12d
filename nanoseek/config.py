"""ModelConfig: one flat dataclass for every DeepSeek-V2/V3-style model, plus named presets.

Field names are those of DeepSeek's own inference `ModelArgs` (DeepSeek-V3 `inference/model.py`), so the
official JSON configs map one to one; the fields after `mscale` are nanoseek's own. The official presets
(`deepseek-v2-lite`, `deepseek-v2`, `deepseek-v3`) reproduce `configs/config_{16B,236B,671B}.json` and the
Hugging Face config.json of each model (reference/deepseek-v3.md §2).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class ModelConfig:
    # --- DeepSeek `ModelArgs` fields (same names, same meaning) ---
    max_seq_len: int = 4096  # longest sequence the RoPE tables are built for
    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944  # width of the dense SwiGLU layers
    moe_inter_dim: int = 1408  # width of one routed (and one shared) expert
    n_layers: int = 27
    n_dense_layers: int = 1  # the first n_dense_layers use a dense FFN, the rest MoE
    n_heads: int = 16
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3)
    route_scale: float = 1.0
    q_lora_rank: int = 0  # 0 = no query compression (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0  # YaRN is applied when rope_factor != 1
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0  # softmax scale × (0.1·mscale·ln(rope_factor) + 1)² under YaRN (HF mscale_all_dim)
    # --- nanoseek's own fields ---
    n_mtp_layers: int = 0  # depth D of multi-token prediction (V3: 1)
    norm_eps: float = 1e-6
    init_std: float = 0.006  # V2/V3 reports: every parameter ~ N(0, 0.006)
    attn_impl: str = "naive"  # "naive" (per-head K/V) or "absorb" (latent space, what the KV cache holds)
    route_norm: bool | None = None  # renormalise top-k weights; None = yes for sigmoid, no for softmax
    rope_attn_factor: float = 1.0  # extra factor on cos/sin (HF yarn `attention_factor`); 1 for DeepSeek
    rope_truncate: bool = True  # YaRN: floor/ceil the correction range (HF `truncate`)
    attn_bias: bool = False  # biases on wq_a/wq, wkv_a, wo (HF `attention_bias`; no DeepSeek model has them)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return max(self.n_layers - self.n_dense_layers, 0) if self.n_routed_experts > 0 else 0

    @property
    def normalize_topk(self) -> bool:
        return self.score_func == "sigmoid" if self.route_norm is None else bool(self.route_norm)

    @property
    def uses_yarn(self) -> bool:
        return self.rope_factor != 1.0

    @property
    def softmax_scale(self) -> float:
        """192^-1/2 for V3, times mscale² under YaRN (both q and k carry √t = 0.1·ln s + 1; V3 report §4.3)."""
        scale = self.qk_head_dim**-0.5
        if self.uses_yarn and self.rope_factor > 1.0:  # like HF, no attention temperature when shrinking
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration cannot describe a model."""

        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid ModelConfig: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
        need(self.qk_nope_head_dim >= 0 and self.v_head_dim > 0, "qk_nope_head_dim >= 0 and v_head_dim > 0")
        need(self.q_lora_rank >= 0, "q_lora_rank must be >= 0 (0 = no query compression)")
        need(self.score_func in ("softmax", "sigmoid"), f"score_func must be softmax or sigmoid, got {self.score_func!r}")
        need(self.attn_impl in ("naive", "absorb"), f"attn_impl must be naive or absorb, got {self.attn_impl!r}")
        need(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers must be between 0 and n_layers")
        need(self.n_mtp_layers >= 0, "n_mtp_layers must be >= 0")
        if self.n_dense_layers > 0 or self.n_routed_experts == 0:
            need(self.inter_dim > 0, "inter_dim must be positive for dense layers")
        if self.n_moe_layers > 0:
            self._validate_moe(need)

    def _validate_moe(self, need) -> None:
        E, G = self.n_routed_experts, self.n_expert_groups
        need(self.moe_inter_dim > 0, "moe_inter_dim must be positive")
        need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
        need(G >= 1 and E % G == 0, f"n_routed_experts ({E}) must be divisible by n_expert_groups ({G})")
        need(1 <= self.n_limited_groups <= G, f"n_limited_groups must be in [1, n_expert_groups={G}]")
        if G > 1 and self.score_func == "sigmoid":
            need(E // G >= 2, "sigmoid routing scores a group by its top-2 experts: need >= 2 experts per group")
        reachable = self.n_limited_groups * (E // G)
        need(1 <= self.n_activated_experts <= reachable,
             f"n_activated_experts ({self.n_activated_experts}) must be in [1, n_limited_groups × experts per "
             f"group = {reachable}]")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- presets
# The official presets copy DeepSeek's inference configs (reference/deepseek-v3.md §2.1), with the
# 16384-token demo context; V2 uses mscale 0.707 as in its HF config (the demo JSON omits it, §7.4).
PRESETS: dict[str, dict] = {
    # For unit tests and first steps: every mechanism switched on (q compression, groups, sigmoid, MTP), tiny
    # sizes, with a vocabulary a byte-level BPE can train and a context that holds a prompt and its answer, so
    # `pretrain --preset tiny` → generate → chat → eval → grpo runs with default flags.
    "tiny": dict(
        max_seq_len=256, vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
        n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
        n_limited_groups=2, score_func="sigmoid", route_scale=2.5, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, original_seq_len=256, rope_factor=1.0,
        n_mtp_layers=1,
    ),
    # The CPU speedrun size: V3's structure (sigmoid routing over expert groups, 1 shared expert, MLA with
    # V3's head proportions nope:rope:v = 2:1:2, MTP) at ~9M parameters, ~3.4M active per token. With
    # kv_lora_rank = v_head_dim, latent-space attention costs the same FLOPs as the naive form and skips
    # expanding per-head keys and values, so this preset trains with attn_impl="absorb" (7% faster here).
    "small": dict(
        max_seq_len=512, vocab_size=4096, dim=256, inter_dim=768, moe_inter_dim=128, n_layers=4,
        n_dense_layers=1, n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=2,
        n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, original_seq_len=512,
        rope_factor=1.0, n_mtp_layers=1, attn_impl="absorb",
    ),
    # Distillation students (R1 §4.1): a dense model and a smaller MoE, both sharing the small vocabulary.
    "small-dense": dict(
        max_seq_len=512, vocab_size=4096, dim=192, inter_dim=512, n_layers=4, n_dense_layers=4, n_heads=4,
        n_routed_experts=0, n_shared_experts=0, n_activated_experts=1, q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, original_seq_len=512, rope_factor=1.0,
        n_mtp_layers=0,
    ),
    "small-lite": dict(
        max_seq_len=512, vocab_size=4096, dim=192, inter_dim=512, moe_inter_dim=96, n_layers=4, n_dense_layers=1,
        n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=1,
        n_limited_groups=1, score_func="sigmoid", route_scale=1.0, q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, original_seq_len=512, rope_factor=1.0,
        n_mtp_layers=0,
    ),
    "deepseek-v2-lite": dict(
        max_seq_len=16384, vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
        n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
        n_expert_groups=1, n_limited_groups=1, score_func="softmax", route_scale=1.0, q_lora_rank=0,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mscale=0.707,
    ),
    "deepseek-v2": dict(
        max_seq_len=16384, vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60,
        n_dense_layers=1, n_heads=128, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
        n_expert_groups=8, n_limited_groups=3, score_func="softmax", route_scale=16.0, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mscale=0.707,
    ),
    "deepseek-v3": dict(
        max_seq_len=16384, vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
        n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
        n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", route_scale=2.5, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mscale=1.0,
        n_mtp_layers=1,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset as a ModelConfig; unknown names raise ValueError listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
