"""nanoseek stats / cost / import / export: a model's scale and cost, and checkpoint conversion both ways.

    nanoseek stats deepseek-v3                     # parameters, KV cache per token, training FLOPs per token
    nanoseek cost deepseek-v3 --tokens 14.8e12 --gpu h800
    nanoseek import path/to/DeepSeek-V3 runs/v3    # Hugging Face directory -> nanoseek checkpoint
    nanoseek export --ckpt runs/base runs/base-hf  # nanoseek checkpoint (or run) -> Hugging Face directory
    nanoseek export --ckpt runs/base --to gguf runs/base.gguf  # -> one GGUF file for llama.cpp
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import PRESETS, family_entry, get_preset
from ..options import check, check_out_dir, option
from ..stats import COUNTING, DEFAULT_GPUS, DEFAULT_MFU, DEFAULT_PRICE, GPU_PEAK_FLOPS


@dataclass
class StatsConfig:
    """Scale of a model: parameters (total, active), KV cache bytes per token, training FLOPs per token. MODEL is a
    preset name or a nanoseek / Hugging Face checkpoint directory."""

    model: str = option("", help=f"preset ({', '.join(PRESETS)}) or checkpoint directory", positional=True,
                        metavar="PRESET|CKPT")
    compare: bool = option(False, help="the published comparison rows: DeepSeek-V2/V3, Qwen2.5-72B, LLaMA-3.1-405B")
    seq_len: int = option(0, help="training sequence length (0: min(max_seq_len, 4096))", min=0)
    json: bool = option(False, help="machine-readable output")

    def __post_init__(self):
        check(self)
        if not self.model and not self.compare:
            raise ValueError("give a PRESET or CKPT directory, or --compare")


@dataclass
class CostConfig:
    """Training cost = tokens × training FLOPs per token ÷ (GPU peak × MFU), in GPU-hours, dollars and days."""

    model: str = option(help=f"preset ({', '.join(PRESETS)}) or checkpoint directory", positional=True,
                        metavar="PRESET|CKPT")
    tokens: float = option(help="training tokens, e.g. 14.8e12 or 14.8T (K, M, B, T suffixes)", above=0)
    gpu: str = option(help="GPU type", choices=tuple(GPU_PEAK_FLOPS))
    mfu: float = option(DEFAULT_MFU, help="model FLOPs utilisation (DeepSeek-V3's measured value)", above=0, max=1)
    price: float = option(DEFAULT_PRICE, help="USD per GPU-hour (the V3 report's)", min=0)
    gpus: int = option(DEFAULT_GPUS, help="GPU count for the wall-clock estimate", min=1)
    seq_len: int = option(0, help="training sequence length (0: min(the model's max_seq_len, 4096))", min=0)
    json: bool = option(False, help="machine-readable output")

    def __post_init__(self):
        check(self)


@dataclass
class ImportConfig:
    """Read a Hugging Face DeepSeek checkpoint (config.json + single or sharded, optionally FP8 safetensors) and
    write it as a nanoseek checkpoint directory OUT (written beside OUT, then renamed into place)."""

    hf_dir: str = option(help="Hugging Face model directory", positional=True, metavar="HF_DIR")
    out: str = option(help="nanoseek checkpoint directory to write", positional=True, metavar="OUT")
    force: bool = option(False, help="replace OUT if it is a checkpoint written earlier")

    def __post_init__(self):
        check(self)


@dataclass
class ExportConfig:
    """Write a nanoseek checkpoint (or a run's latest) as a Hugging Face directory that transformers'
    AutoModelForCausalLM loads, with its tokenizer (written beside OUT, then renamed into place), or as one GGUF
    file that llama.cpp loads (`--to gguf`: fp32 tensors, the tokenizer and chat template inside)."""

    ckpt: str = option(help="nanoseek checkpoint or run directory")
    out: str = option(help="Hugging Face directory (or, with --to gguf, the .gguf file) to write", positional=True,
                      metavar="OUT")
    to: str = option("hf", help="target format: a Hugging Face directory, or a GGUF file for llama.cpp",
                     choices=("hf", "gguf"))
    fp8: bool = option(False, help="FP8 weights with 128×128 weight_scale_inv blocks, as DeepSeek ships them (hf only)")
    force: bool = option(False, help="replace OUT if it is a model directory (or GGUF file) written earlier")

    def __post_init__(self):
        check(self)
        if self.to == "gguf" and self.fp8:
            raise ValueError("--fp8 applies to --to hf only (the GGUF file holds fp32 tensors)")


# ----------------------------------------------------------------------------- stats and cost


def resolve_config(spec: str):
    """A preset name or a checkpoint directory (nanoseek or Hugging Face) -> (display name, ModelConfig)."""
    if spec in PRESETS:
        return spec, get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        from ..checkpoint import read_config

        return path.name or spec, read_config(path)
    raise ValueError(f"unknown preset or checkpoint directory {spec!r}; presets: {', '.join(PRESETS)}")


def human(n: float, unit: str = "") -> str:
    """1.2e9 -> '1.20B' (counts) or, with a unit, SI prefixes: '1.20 GFLOP'."""
    prefixes = ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")) if unit else (
        (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
    for scale, suffix in prefixes:
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _print_stats(name: str, s: dict, family: str = "v3") -> None:
    print(f"{name}  (training sequence length {s['seq_len']})")
    print(f"  total parameters        {human(s['total_params']):>10}   (without MTP modules)")
    print(f"  active parameters/token {human(s['active_params']):>10}   (without the embedding lookup; "
          "output head included)")
    print(f"  MTP parameters          {human(s['mtp_params']):>10}   (unique to the MTP modules; embedding and "
          "head are shared)")
    kv, naive = family_entry(COUNTING, family, "stats.COUNTING").cache_holds
    print(f"  KV cache / token        {s['kv_cache_bytes_per_token']:>10,} B ({kv})")
    print(f"  KV cache / token, naive {s['kv_cache_bytes_per_token_naive']:>10,} B ({naive})")
    print(f"  training FLOPs / token  {human(s['train_flops_per_token'], 'FLOP'):>10}   (6 × active + causal "
          "attention, forward + backward)")


def _print_compare(rows: list[dict]) -> None:
    print(f"{'model':<16}{'total':>10}{'active':>10}{'KV B/token':>13}{'KV naive':>13}{'train GFLOP/token':>19}")
    for r in rows:
        print(f"{r['name']:<16}{human(r['total_params']):>10}{human(r['active_params']):>10}"
              f"{r['kv_cache_bytes_per_token']:>13,}{r['kv_cache_bytes_per_token_naive']:>13,}"
              f"{r['train_flops_per_token'] / 1e9:>19.1f}")
    print(f"(sequence length {rows[0]['seq_len']}; active excludes the embedding lookup; KV cache in bf16; "
          "published: V3 70,272 B and 250 GFLOP, LLaMA-3.1-405B 516,096 B and 2,448 GFLOP)")


def stats(cfg: StatsConfig) -> None:
    from ..stats import compare_rows, model_stats

    if cfg.compare:
        rows = compare_rows(cfg.seq_len or 4096)
        if cfg.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_compare(rows)
        return
    name, mcfg = resolve_config(cfg.model)
    s = model_stats(mcfg, cfg.seq_len or None)
    if cfg.json:
        print(json.dumps({"name": name, **s}, indent=2))
    else:
        _print_stats(name, s, mcfg.family)


def cost(cfg: CostConfig) -> None:
    from ..stats import training_cost

    name, mcfg = resolve_config(cfg.model)
    seq_len = cfg.seq_len or min(mcfg.max_seq_len, 4096)  # a 512-token model is not trained on 4,096-token rows
    c = training_cost(mcfg, cfg.tokens, cfg.gpu, cfg.mfu, cfg.price, cfg.gpus, seq_len)
    if cfg.json:
        print(json.dumps({"name": name, **c}, indent=2))
        return
    print(f"{name}: {human(c['tokens'])} tokens × {c['train_flops_per_token'] / 1e9:.1f} GFLOP/token "
          f"= {c['total_flops']:.3e} FLOP")
    print(f"  {cfg.gpu.upper()} at {c['mfu']:.2%} MFU: {_amount(c['gpu_hours'])} GPU-hours, "
          f"${_amount(c['usd'])} at ${c['price_per_gpu_hour']:g}/GPU-hour, "
          f"{_amount(c['days'] * 24 * 3600, seconds=True)} on {c['n_gpus']} GPUs")


def _amount(x: float, seconds: bool = False) -> str:
    """3 significant figures with an M/K unit where it helps (5.347M, 12.3K, 0.0468); a duration in days,
    hours, minutes or seconds, whichever reads best."""
    if seconds:
        for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
            if x >= size:
                return f"{x / size:.1f} {unit}"
        return f"{x:.1f} seconds"
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if x >= size:
            return f"{x / size:.3f}{unit}"
    return f"{x:.3g}"


# ----------------------------------------------------------------------------- conversion


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists()


def import_hf(cfg: ImportConfig) -> Path:
    from ..checkpoint import save_model
    from ..hf import load_hf

    out = Path(cfg.out)
    check_out_dir(out, "OUT", own=_is_model_dir(out), force=cfg.force)
    model = load_hf(cfg.hf_dir)
    tok = Path(cfg.hf_dir) / "tokenizer.json"
    save_model(model, out, tokenizer_file=tok if tok.exists() else None,
               meta={"imported_from": str(Path(cfg.hf_dir).resolve())})
    print(f"imported {cfg.hf_dir} -> {out}", file=sys.stderr)
    return out


def export_hf(cfg: ExportConfig) -> Path:
    from ..checkpoint import atomic_dir, load_model, resolve
    from ..hf import save_hf

    if cfg.to == "gguf":
        return export_gguf(cfg)
    out = Path(cfg.out)
    check_out_dir(out, "OUT", own=_is_model_dir(out), force=cfg.force)
    source = resolve(cfg.ckpt)  # a run directory stands for its latest checkpoint, tokenizer included
    model = load_model(source)
    tok = source / "tokenizer.json"
    with atomic_dir(out) as tmp:  # a full disk leaves no config.json without weights behind
        # with the tokenizer, the directory is complete: tokenizer files, chat template, eos/bos, sampling defaults
        save_hf(model, tmp, fp8=cfg.fp8, tokenizer_file=tok if tok.exists() else None)
    family = json.loads((out / "config.json").read_text())["model_type"]
    print(f"exported {source} -> {out} (Hugging Face {family})", file=sys.stderr)
    return out


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def export_gguf(cfg: ExportConfig) -> Path:
    from ..checkpoint import load_model, resolve
    from ..gguf_export import save_gguf, unsupported

    out = Path(cfg.out)
    if out.is_dir():
        raise ValueError(f"OUT {out}: is a directory; --to gguf writes one file (e.g. {out / 'model.gguf'})")
    if out.exists() and not (cfg.force and _is_gguf(out)):
        raise ValueError(f"OUT {out}: exists; pass --force to replace a GGUF file written earlier"
                         if _is_gguf(out) else f"OUT {out}: exists and is not a GGUF file (nothing is touched)")
    if not out.parent.exists():
        raise ValueError(f"OUT {out}: its directory {out.parent} does not exist")
    source = resolve(cfg.ckpt)
    model = load_model(source)
    why = unsupported(model.cfg)
    if why:
        raise ValueError(f"cannot write GGUF: {why}")
    try:
        import gguf  # noqa: F401 -- the writer is an optional dependency
    except ImportError:
        raise ValueError("--to gguf needs the gguf package: pip install gguf") from None
    tok = source / "tokenizer.json"
    tmp = out.with_name(out.name + ".partial")
    save_gguf(model, tmp, tok if tok.exists() else None, name=source.name)
    tmp.replace(out)  # a full disk leaves a .partial file, never a truncated OUT
    print(f"exported {source} -> {out} (GGUF, llama.cpp deepseek2)", file=sys.stderr)
    return out
