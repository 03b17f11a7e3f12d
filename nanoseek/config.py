"""ModelConfig: one flat dataclass for every DeepSeek generation (V2, V3, V3.2, V4), plus named presets.

Field names are those of DeepSeek's own inference `ModelArgs` (DeepSeek-V3 `inference/model.py`; the V3.2 and
V4 releases add the indexer, compression and hyper-connection fields under the names they use), so the
official JSON configs map one to one; the fields after `mscale` in the first block are nanoseek's own. The
generation follows from the fields (`family`): `compress_ratios` set = V4 (hybrid CSA/HCA/sliding-window
attention, mHC), else `index_n_heads` > 0 = V3.2 (MLA + DeepSeek Sparse Attention), else V2/V3 (dense MLA).
The official presets and the sources of their numbers are listed in docs/v4.md.

What the code does differently per generation is declared once, in `FAMILIES` (one `Family` record each), not
as `family == "v4"` tests spread over the modules. This file is the bottom layer, so a record holds data and
ModelConfig's own methods only; the three concerns that need code from higher layers keep a table keyed by the
same names, looked up through `family_entry`: generations.CLASSES (the model class), stats.COUNTING (how its
parameters, KV cache and attention FLOPs are counted) and hf.LAYOUTS (its Hugging Face config and tensor
names). Adding a generation is a record here plus one entry in each of those tables (docs/architecture.md,
"Adding a model generation"); a table without it fails on first use with a message naming the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Family:
    """One model generation's properties that code elsewhere branches on (the record of `FAMILIES`)."""

    selected_by: Callable[["ModelConfig"], bool]  # its config fields are set (the latest that holds wins)
    validate: Callable[["ModelConfig", Callable], None]  # its own checks, called by ModelConfig.validate
    # MLA (V2 report §2.1): heads of qk_head_dim over a kv_lora_rank latent, softmax scale with the YaRN
    # temperature (V3 report §4.3); False = V4's shared-KV MQA, head_dim wide, with no temperature
    mla: bool
    # its attention takes packed-document segments (pretrain --document-mask); V3.2's sparse attention and V4's
    # compressed attention take none
    document_segments: bool
    # pretraining trains the lightning indexer by its KL to the main attention, dense during a warm-up
    # (V3.2 report §2.1.1: sparse.IndexerLog); V4's CSA indexer takes no such loss here
    indexer_kl: bool


def family_entry(table: dict, family: str, where: str):
    """table[family], or one ValueError naming the table a new generation has to be added to."""
    if family not in table:
        raise ValueError(f"model family {family!r} is not registered in {where} (registered: {', '.join(table)}); "
                         "a new generation needs an entry there (docs/architecture.md, 'Adding a model generation')")
    return table[family]


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
    # --- V3.2 DeepSeek Sparse Attention (arXiv 2512.02556 §2.1); V4 CSA layers use the same indexer ---
    index_n_heads: int = 0  # lightning-indexer heads H^I; 0 = dense MLA (V2/V3)
    index_head_dim: int = 128  # indexer head dim d^I (its first/last qk_rope_head_dim dims carry RoPE)
    index_topk: int = 2048  # keys (V3.2) or compressed entries (V4 CSA) each query keeps
    # --- V4 hybrid attention, mHC and hash routing (DeepSeek-V4 report, arXiv 2606.19348 §2) ---
    compress_ratios: tuple[int, ...] = ()  # per layer: 0 sliding window only, csa_ratio = CSA, other = HCA
    csa_ratio: int = 4  # m: the compression of CSA layers (the ones with an indexer); V4: 4 (HCA: 128)
    head_dim: int = 512  # V4 shared-KV MQA head dim; its last qk_rope_head_dim dims carry RoPE
    window_size: int = 128  # n_win: raw keys every V4 query sees (itself and the window_size - 1 before it)
    o_groups: int = 8  # g: head groups of the grouped low-rank output projection
    o_lora_rank: int = 1024  # d_g: per-group intermediate width of that projection
    compress_rope_theta: float = 160000.0  # RoPE base of compressed layers (YaRN applies to them only)
    hc_mult: int = 4  # n_hc: residual streams of manifold-constrained hyper-connections (mHC)
    hc_sinkhorn_iters: int = 20  # Sinkhorn-Knopp iterations projecting the stream mixer to doubly stochastic
    hc_eps: float = 1e-6
    n_hash_layers: int = 0  # the first n_hash_layers MoE layers route by a fixed token-id -> experts table
    swiglu_limit: float = 0.0  # clamp of the SwiGLU gate/up pre-activations (V4: 10); 0 = no clamp

    def __post_init__(self):
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios)  # JSON gives a list
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def family(self) -> str:
        """'v4' (hybrid compressed attention + mHC), 'v32' (MLA + sparse attention) or 'v3' (V2/V3 dense MLA):
        the latest of FAMILIES whose fields this config sets."""
        return next(name for name, fam in reversed(FAMILIES.items()) if fam.selected_by(self))

    @property
    def family_traits(self) -> Family:
        """The Family record of this config's generation: what the rest of the code branches on."""
        return FAMILIES[self.family]

    def layer_kind(self, layer: int) -> str:
        """A V4 layer's attention: 'sliding' (window only), 'csa' (compressed + indexer top-k) or 'hca'."""
        r = self.compress_ratios[layer]
        return "sliding" if r == 0 else "csa" if r == self.csa_ratio else "hca"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return max(self.n_layers - self.n_dense_layers, 0) if self.n_routed_experts > 0 else 0

    @property
    def normalize_topk(self) -> bool:
        """Renormalise the top-k weights: route_norm, or by default for sigmoid and sqrtsoftplus scores."""
        return self.score_func != "softmax" if self.route_norm is None else bool(self.route_norm)

    @property
    def uses_yarn(self) -> bool:
        return self.rope_factor != 1.0

    @property
    def softmax_scale(self) -> float:
        """192^-1/2 for V3, times mscale² under YaRN (both q and k carry √t = 0.1·ln s + 1; V3 report §4.3).

        V4: head_dim^-1/2, without a YaRN temperature (as in transformers' DeepseekV4Attention)."""
        if not self.family_traits.mla:
            return self.head_dim**-0.5
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

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank >= 0, "q_lora_rank must be >= 0 (0 = no query compression)")
        need(self.score_func in ("softmax", "sigmoid", "sqrtsoftplus"),
             f"score_func must be softmax, sigmoid or sqrtsoftplus, got {self.score_func!r}")
        need(self.attn_impl in ("naive", "absorb"), f"attn_impl must be naive or absorb, got {self.attn_impl!r}")
        need(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers must be between 0 and n_layers")
        need(self.n_mtp_layers >= 0, "n_mtp_layers must be >= 0")
        need(self.index_n_heads >= 0, "index_n_heads must be >= 0 (0 = no indexer)")
        self.family_traits.validate(self, need)
        if self.index_n_heads > 0:
            need(self.q_lora_rank > 0, "the lightning indexer reads the query latent: q_lora_rank must be > 0")
            need(self.index_head_dim >= self.qk_rope_head_dim and self.index_head_dim % 2 == 0,
                 f"index_head_dim must be even and >= qk_rope_head_dim ({self.qk_rope_head_dim})")
            need(self.index_topk > 0, "index_topk must be positive")
        if self.n_dense_layers > 0 or self.n_routed_experts == 0:
            need(self.inter_dim > 0, "inter_dim must be positive for dense layers")
        if self.n_moe_layers > 0:
            self._validate_moe(need)

    def _validate_mla(self, need) -> None:
        """V2/V3/V3.2: MLA's dimensions, and none of V4's features."""
        need(self.kv_lora_rank > 0, f"kv_lora_rank must be positive, got {self.kv_lora_rank}")
        need(self.qk_nope_head_dim >= 0 and self.v_head_dim > 0, "qk_nope_head_dim >= 0 and v_head_dim > 0")
        need(self.score_func != "sqrtsoftplus", "score_func sqrtsoftplus is V4's: set compress_ratios too")
        need(self.n_hash_layers == 0 and self.swiglu_limit == 0,
             "n_hash_layers and swiglu_limit are V4 features: set compress_ratios too")

    def _validate_v4(self, need) -> None:
        L, ratios = self.n_layers, self.compress_ratios
        need(len(ratios) == L, f"compress_ratios needs one entry per layer ({L}), got {len(ratios)}")
        need(all(r >= 0 for r in ratios), "compress_ratios entries must be >= 0 (0 = sliding window only)")
        need(len({r for r in ratios if r}) <= 2, "compress_ratios may hold at most two rates (CSA and HCA)")
        need(self.csa_ratio > 0, "csa_ratio must be positive")
        need(self.head_dim >= self.qk_rope_head_dim and self.head_dim % 2 == 0,
             f"head_dim must be even and >= qk_rope_head_dim ({self.qk_rope_head_dim})")
        need(self.q_lora_rank > 0, "V4 attention needs query compression: q_lora_rank must be > 0")
        need(self.window_size > 0, "window_size must be positive")
        need(self.o_groups > 0 and self.n_heads % self.o_groups == 0,
             f"n_heads ({self.n_heads}) must be divisible by o_groups ({self.o_groups})")
        need(self.o_lora_rank > 0, "o_lora_rank must be positive")
        need(self.hc_mult >= 1 and self.hc_sinkhorn_iters >= 1, "hc_mult and hc_sinkhorn_iters must be >= 1")
        need(self.n_routed_experts > 0 and self.n_dense_layers == 0,
             "V4 blocks are all MoE: n_routed_experts > 0 and n_dense_layers = 0")
        need(self.n_shared_experts == 1, "V4 MoE has exactly one shared expert (n_shared_experts = 1)")
        need(self.n_expert_groups == 1, "V4 routing has no expert groups (n_expert_groups = 1)")
        need(0 <= self.n_hash_layers <= L, "n_hash_layers must be between 0 and n_layers")
        need(self.swiglu_limit > 0, "V4 clamps its SwiGLU pre-activations: swiglu_limit must be > 0 (V4: 10)")
        need(self.rope_attn_factor == 1.0, "V4 RoPE has no attention factor (rope_attn_factor = 1)")
        need(self.normalize_topk, "V4 always renormalises its top-k routing weights (route_norm must not be False)")
        if any(self.layer_kind(i) == "csa" for i in range(L)):
            need(self.index_n_heads > 0, "CSA layers need the lightning indexer: index_n_heads must be > 0")

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


# ---------------------------------------------------------------------------- generations

# The generations in order of release: a config is the latest one whose fields it sets (a V4 config sets
# index_n_heads too). The model classes, counting rules and Hugging Face layouts of each live in
# generations.CLASSES, stats.COUNTING and hf.LAYOUTS under the same names.
FAMILIES: dict[str, Family] = {
    "v3": Family(selected_by=lambda c: True, validate=ModelConfig._validate_mla, mla=True, document_segments=True,
                 indexer_kl=False),  # V2 and V3: dense MLA
    "v32": Family(selected_by=lambda c: c.index_n_heads > 0, validate=ModelConfig._validate_mla, mla=True,
                  document_segments=False, indexer_kl=True),
    "v4": Family(selected_by=lambda c: bool(c.compress_ratios), validate=ModelConfig._validate_v4, mla=False,
                 document_segments=False, indexer_kl=False),
}


# ---------------------------------------------------------------------------- presets
# The official presets copy DeepSeek's inference configs (the config.json files published with the DeepSeek weights), with the
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
    # The speedrun's teacher: V3's structure (sigmoid routing over expert groups, a shared expert, MLA) at dim 128
    # with a 1,024-entry vocabulary, sized so that pretraining and R1's stages fit 20 minutes on 2 AVX2 cores in
    # fp32. Departures from the V3 recipe, each measured on chain_sum pretraining (docs/results/r1-zero.md): wide
    # heads (4 × 64 + 32 rope at dim 128: the skill the task needs is copying operands from the question, and with
    # 4 × 32 heads it had not appeared after 300 steps), init_std 0.02 instead of V3's 0.006 (at dim 128, 0.006 is
    # 1/13 of 1/√dim and the copying skill appeared later), no MTP module (+37% step time here; `small` keeps it),
    # and naive attention for training (kv_lora_rank 64 is wider than the rope part, so latent-space attention
    # would cost 1.7x the FLOPs).
    "mini": dict(
        max_seq_len=512, vocab_size=1024, dim=128, inter_dim=384, moe_inter_dim=128, n_layers=4, n_dense_layers=1,
        n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
        n_limited_groups=2, score_func="sigmoid", route_scale=2.5, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, original_seq_len=512, rope_factor=1.0,
        n_mtp_layers=0, init_std=0.02, attn_impl="naive",
    ),
    # Its distillation student: dense, dim 96, 0.64M parameters (0.54M active, 0.71x the teacher's).
    "mini-dense": dict(
        max_seq_len=512, vocab_size=1024, dim=96, inter_dim=256, n_layers=4, n_dense_layers=4, n_heads=4,
        n_routed_experts=0, n_shared_experts=0, n_activated_experts=1, q_lora_rank=48, kv_lora_rank=48,
        qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=24, original_seq_len=512, rope_factor=1.0,
        n_mtp_layers=0, init_std=0.02, attn_impl="naive",
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


def _v4_ratios(n_layers: int, first: tuple[int, ...]) -> tuple[int, ...]:
    """V4's attention schedule: `first` layers, then CSA (4) and HCA (128) alternating, CSA first."""
    return first + tuple(4 if i % 2 == 0 else 128 for i in range(n_layers - len(first)))


# DeepSeek-V3.2 is V3 plus the lightning indexer (64 heads × 128, top-2048; arXiv 2512.02556 §2.1); the
# numbers are transformers' DeepseekV32Config defaults (checkpoint deepseek-ai/DeepSeek-V3.2-Exp).
PRESETS["deepseek-v3.2"] = dict(PRESETS["deepseek-v3"], max_seq_len=163840, index_n_heads=64, index_head_dim=128,
                                index_topk=2048)
# DeepSeek-V4: the config.json files of deepseek-ai/DeepSeek-V4-Flash and -Pro on the Hugging Face hub
# (transformers' DeepseekV4Config defaults are Flash's, its docstrings quote Pro's head and group sizes).
# Every block is MoE (hash-routed first 3), one shared expert, sqrtsoftplus scores, 1M context with YaRN ×16 on
# the compressed layers only. The MTP module's attention is sliding-window only (the trailing 0 in the JSON).
_V4 = dict(
    vocab_size=129280, n_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8,
    o_lora_rank=1024, window_size=128, csa_ratio=4, index_n_heads=64, index_head_dim=128, index_topk=512,
    rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=65536, beta_fast=32,
    beta_slow=1, mscale=0.0, max_seq_len=1048576, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    n_dense_layers=0, inter_dim=0, n_shared_experts=1, n_activated_experts=6, n_expert_groups=1,
    n_limited_groups=1, score_func="sqrtsoftplus", n_hash_layers=3, swiglu_limit=10.0, n_mtp_layers=1,
    kv_lora_rank=0, qk_nope_head_dim=0, v_head_dim=0,
)
PRESETS["deepseek-v4-flash"] = dict(_V4, dim=4096, n_layers=43, n_routed_experts=256, moe_inter_dim=2048,
                                    route_scale=1.5, compress_ratios=_v4_ratios(43, (0, 0)))
PRESETS["deepseek-v4-pro"] = dict(_V4, dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16,
                                  index_topk=1024, n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5,
                                  compress_ratios=_v4_ratios(61, (128, 128)))
# Small trainable generations, sized like `small` (same width, depth, experts and vocabulary).
PRESETS["small-v32"] = dict(PRESETS["small"], index_n_heads=4, index_head_dim=64, index_topk=128)
PRESETS["small-v4"] = dict(
    PRESETS["small"], n_dense_layers=0, inter_dim=0, n_expert_groups=1, n_limited_groups=1, score_func="sqrtsoftplus",
    route_scale=1.5, n_hash_layers=1, swiglu_limit=10.0, head_dim=64, qk_rope_head_dim=16, o_groups=2,
    o_lora_rank=64, window_size=64, compress_ratios=(0, 4, 32, 4), index_n_heads=4, index_head_dim=32,
    index_topk=32, kv_lora_rank=0, qk_nope_head_dim=0, v_head_dim=0, attn_impl="absorb",
)
# For unit tests: every V3.2 / V4 mechanism at tiny sizes, with short windows so that short sequences exercise
# top-k selection, the sliding window and several compression blocks.
PRESETS["tiny-v32"] = dict(PRESETS["tiny"], index_n_heads=4, index_head_dim=16, index_topk=6)
PRESETS["tiny-v4"] = dict(
    PRESETS["tiny"], n_dense_layers=0, inter_dim=0, n_expert_groups=1, n_limited_groups=1, score_func="sqrtsoftplus",
    route_scale=1.5, n_hash_layers=1, swiglu_limit=10.0, head_dim=32, qk_rope_head_dim=8, o_groups=2,
    o_lora_rank=16, window_size=8, compress_ratios=(0, 4, 8), index_n_heads=4, index_head_dim=16, index_topk=3,
    kv_lora_rank=0, qk_nope_head_dim=0, v_head_dim=0, hc_sinkhorn_iters=5,
)


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset as a ModelConfig; unknown names raise ValueError listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
