"""The `nanoseek` command: one subcommand per stage. Bad input prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from .config import PRESETS, ModelConfig, get_preset
from .errors import UsageError


def _resolve_config(spec: str) -> tuple[str, ModelConfig]:
    """A preset name or a checkpoint directory (nanoseek or Hugging Face) -> (display name, config)."""
    if spec in PRESETS:
        return spec, get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        from .checkpoint import read_config

        return path.name or spec, read_config(path)
    raise UsageError(f"unknown preset or checkpoint directory {spec!r}; presets: {', '.join(PRESETS)}")


# ----------------------------------------------------------------------------- formatting


def _human(n: float, unit: str = "") -> str:
    """1.2e9 -> '1.20B' (counts) or, with a unit, SI prefixes: '1.20 GFLOP'."""
    prefixes = ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")) if unit else (
        (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
    for scale, suffix in prefixes:
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


_KV_LABELS = {  # what the cache holds, per generation (stats.py)
    "v3": ("absorbed MLA latent + rope key, bf16", "per-head K and V, bf16"),
    "v32": ("MLA latent + rope key + indexer key, bf16", "per-head K and V + indexer key, bf16"),
    "v4": ("window + compressed entries, averaged over the context, bf16", "every token's raw K=V, bf16"),
}


def _print_stats(name: str, s: dict, family: str = "v3") -> None:
    print(f"{name}  (training sequence length {s['seq_len']})")
    print(f"  total parameters        {_human(s['total_params']):>10}   (without MTP modules)")
    print(f"  active parameters/token {_human(s['active_params']):>10}   (without the embedding lookup; "
          "output head included)")
    print(f"  MTP parameters          {_human(s['mtp_params']):>10}   (unique to the MTP modules; embedding and "
          "head are shared)")
    kv, naive = _KV_LABELS[family]
    print(f"  KV cache / token        {s['kv_cache_bytes_per_token']:>10,} B ({kv})")
    print(f"  KV cache / token, naive {s['kv_cache_bytes_per_token_naive']:>10,} B ({naive})")
    print(f"  training FLOPs / token  {_human(s['train_flops_per_token'], 'FLOP'):>10}   (6 × active + causal "
          "attention, forward + backward)")


def _print_compare(rows: list[dict]) -> None:
    print(f"{'model':<16}{'total':>10}{'active':>10}{'KV B/token':>13}{'KV naive':>13}{'train GFLOP/token':>19}")
    for r in rows:
        print(f"{r['name']:<16}{_human(r['total_params']):>10}{_human(r['active_params']):>10}"
              f"{r['kv_cache_bytes_per_token']:>13,}{r['kv_cache_bytes_per_token_naive']:>13,}"
              f"{r['train_flops_per_token'] / 1e9:>19.1f}")
    print(f"(sequence length {rows[0]['seq_len']}; active excludes the embedding lookup; KV cache in bf16; "
          "published: V3 70,272 B and 250 GFLOP, LLaMA-3.1-405B 516,096 B and 2,448 GFLOP)")


# ----------------------------------------------------------------------------- subcommands


def cmd_stats(args) -> None:
    from .stats import compare_rows, model_stats

    if args.compare:
        rows = compare_rows(args.seq_len or 4096)
        print(json.dumps(rows, indent=2) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            _print_compare(rows)
        return
    if not args.model:
        raise UsageError("give a PRESET or CKPT directory, or --compare")
    name, cfg = _resolve_config(args.model)
    s = model_stats(cfg, args.seq_len)
    if args.json:
        print(json.dumps({"name": name, **s}, indent=2))
    else:
        _print_stats(name, s, cfg.family)


def cmd_cost(args) -> None:
    from .stats import training_cost

    name, cfg = _resolve_config(args.model)
    c = training_cost(cfg, args.tokens, args.gpu, args.mfu, args.price, args.gpus, args.seq_len)
    if args.json:
        print(json.dumps({"name": name, **c}, indent=2))
        return
    print(f"{name}: {_human(c['tokens'])} tokens × {c['train_flops_per_token'] / 1e9:.1f} GFLOP/token "
          f"= {c['total_flops']:.3e} FLOP")
    print(f"  {args.gpu.upper()} at {c['mfu']:.2%} MFU: {c['gpu_hours'] / 1e6:.3f}M GPU-hours, "
          f"${c['usd'] / 1e6:.3f}M at ${c['price_per_gpu_hour']:g}/GPU-hour, "
          f"{c['days']:.1f} days on {c['n_gpus']} GPUs")


def cmd_import(args) -> None:
    from .checkpoint import save_model
    from .hf import load_hf

    model = load_hf(args.hf_dir)
    tok = Path(args.hf_dir) / "tokenizer.json"
    save_model(model, args.out, tokenizer_file=tok if tok.exists() else None,
               meta={"imported_from": str(Path(args.hf_dir).resolve())})
    print(f"imported {args.hf_dir} -> {args.out}", file=sys.stderr)


def cmd_export(args) -> None:
    from .checkpoint import load_model
    from .hf import save_hf

    if args.to != "hf":
        raise UsageError(f"unknown export format {args.to!r}; supported: hf")
    model = load_model(args.ckpt)
    out = Path(args.out)
    save_hf(model, out, fp8=args.fp8)
    tok = Path(args.ckpt) / "tokenizer.json"
    if tok.exists():
        shutil.copyfile(tok, out / "tokenizer.json")
    print(f"exported {args.ckpt} -> {out} (Hugging Face {json.loads((out / 'config.json').read_text())['model_type']})",
          file=sys.stderr)


def cmd_pretrain(args) -> None:
    from .stages.pretrain import NonFiniteError, PretrainConfig, run

    try:
        path = run(config_from_args(PretrainConfig, args))
    except NonFiniteError as e:
        print(f"nanoseek pretrain: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"final checkpoint: {path}", file=sys.stderr)


def cmd_grpo(args) -> None:
    from .stages.grpo import GRPOConfig, run

    path = run(config_from_args(GRPOConfig, args))
    print(f"final checkpoint: {path}", file=sys.stderr)


def cmd_sample(args) -> None:
    from .stages.sample import SampleConfig, run

    counts = run(config_from_args(SampleConfig, args))
    print(f"{counts['generated']} samples, {counts['correct']} correct and well-formed, {counts['kept']} written "
          f"to {args.out}", file=sys.stderr)


def cmd_sft(args) -> None:
    from .stages.sft import SFTConfig, run

    path = run(config_from_args(SFTConfig, args))
    print(f"final checkpoint: {path}", file=sys.stderr)


def cmd_speedrun(args) -> None:
    from .stages.speedrun import SpeedrunConfig, run

    run(config_from_args(SpeedrunConfig, args))


def cmd_eval(args) -> None:
    from .engine import Engine
    from .evaluation import evaluate
    from .tasks import get_task

    if args.n <= 0 or args.k <= 0:
        raise UsageError("--n and --k must be positive")
    task = get_task(args.task, **args.task_args)
    model, tokenizer = _load_for_inference(args.ckpt)
    problems = task.problems(args.seed, args.n, split="heldout")
    r = evaluate(Engine(model, tokenizer), task, problems, k=args.k, temperature=args.temperature,
                 top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.json:
        print(json.dumps({"task": args.task, **r}))
    else:
        print(f"{args.task}: pass@1 {r['accuracy']:.1%} (mean of {r['k']} samples over {r['n']} held-out problems), "
              f"cons@{r['k']} {r['cons_at_k']:.1%}, well-formed {r['format']:.1%}, "
              f"{r['mean_response_tokens']:.1f} tokens per response")


def _load_for_inference(ckpt_dir: str):
    from .checkpoint import load

    model, tokenizer = load(ckpt_dir)
    if tokenizer is None:
        raise UsageError(f"{ckpt_dir}: the checkpoint has no tokenizer.json; text generation needs one")
    return model, tokenizer


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise UsageError(f"{args.prompt_file}: no such file") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"{args.prompt_file}: not UTF-8 text (byte {e.start})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give --prompt TEXT or --prompt-file FILE (one prompt per line)")
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt")
    if args.template == "r1":
        from .template import r1_prompt

        prompts = [r1_prompt(p) for p in prompts]
    return prompts


def _sampling(args):
    from .engine import SamplingParams

    if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("need --max-new-tokens > 0, --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=list(args.stop or []))


def cmd_generate(args) -> None:
    from .engine import Engine

    prompts = _read_prompts(args)
    params = _sampling(args)
    model, tokenizer = _load_for_inference(args.ckpt)
    engine = Engine(model, tokenizer)
    outs = engine.generate(prompts, params, speculative=args.speculative)
    for g in outs:
        print(json.dumps({"text": g.text, "finish_reason": g.finish_reason}) if args.jsonl else g.text)
    st = engine.last_stats
    extra = f", draft acceptance {st.acceptance:.1%}" if args.speculative else ""
    print(f"[{len(outs)} prompt(s), {st.tokens} tokens in {st.seconds:.2f}s = {st.tokens_per_s:.1f} tokens/s{extra}]",
          file=sys.stderr)


def cmd_chat(args) -> None:
    from .chat import chat

    model, tokenizer = _load_for_inference(args.ckpt)
    chat(model, tokenizer, _sampling(args), speculative=args.speculative)


def _add_sampling_arguments(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=max_new, help=f"default {max_new}")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", nargs="+", metavar="TEXT", help="stop when any of these strings is generated")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs an MTP module)")


# ----------------------------------------------------------------------------- parser


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per field of a stage's config dataclass (help text from the field's metadata)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        elif f.type in ("list[str]", list):
            parser.add_argument(flag, nargs="+", default=default, metavar="PATH", help=help_text)
        elif f.type in ("dict", dict):
            parser.add_argument(flag, type=_json_object, default=default, metavar="JSON", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=default, required=required,
                                help=f"{help_text} (default: {default})" if not required else help_text)


def config_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _add_model_tools(sub) -> None:
    presets = ", ".join(PRESETS)
    s = sub.add_parser("stats", help="parameters, KV cache and training FLOPs of a preset or checkpoint",
                       description=f"Scale of a model. PRESET is one of: {presets}; CKPT is a nanoseek or "
                                   "Hugging Face checkpoint directory.")
    s.add_argument("model", nargs="?", metavar="PRESET|CKPT")
    s.add_argument("--compare", action="store_true", help="DeepSeek-V2/V3 vs Qwen2.5-72B and LLaMA-3.1-405B")
    s.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: min(max, 4096))")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_stats)

    c = sub.add_parser("cost", help="GPU-hours and dollars of a training run",
                       description="Training cost = tokens × training FLOPs/token ÷ (GPU peak × MFU).")
    c.add_argument("model", metavar="PRESET|CKPT")
    c.add_argument("--tokens", type=_positive_float, required=True, help="training tokens, e.g. 14.8e12")
    c.add_argument("--gpu", required=True, choices=["h800", "h100", "h200", "b200"])
    c.add_argument("--mfu", type=_positive_float, default=0.3894, help="model FLOPs utilisation (default: V3's 0.3894)")
    c.add_argument("--price", type=float, default=2.0, help="USD per GPU-hour (default: 2, the V3 report's)")
    c.add_argument("--gpus", type=int, default=2048, help="GPU count for the wall-clock estimate (default 2048)")
    c.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_cost)

    i = sub.add_parser("import", help="Hugging Face DeepSeek-V2/V3 checkpoint -> nanoseek checkpoint",
                       description="Reads config.json + (sharded, optionally FP8) safetensors; writes OUT.")
    i.add_argument("hf_dir", metavar="HF_DIR")
    i.add_argument("out", metavar="OUT")
    i.set_defaults(func=cmd_import)

    e = sub.add_parser("export", help="nanoseek checkpoint -> Hugging Face checkpoint",
                       description="Writes a directory that transformers' AutoModelForCausalLM loads.")
    e.add_argument("--ckpt", required=True, help="nanoseek checkpoint directory")
    e.add_argument("--to", default="hf", help="target format (hf)")
    e.add_argument("--fp8", action="store_true", help="write FP8 weights with 128×128 weight_scale_inv blocks")
    e.add_argument("out", metavar="OUT")
    e.set_defaults(func=cmd_export)


def _add_inference_tools(sub) -> None:
    g = sub.add_parser("generate", help="complete prompts with a checkpoint",
                       description="Only the generated text goes to stdout (one completion per prompt); speed and "
                                   "acceptance statistics go to stderr.")
    g.add_argument("--prompt", nargs="+", metavar="TEXT", help="one or more prompts")
    g.add_argument("--prompt-file", help="UTF-8 file with one prompt per line")
    g.add_argument("--template", choices=["none", "r1"], default="none",
                   help="r1: wrap each prompt in the R1 reasoning template (default: raw continuation)")
    g.add_argument("--jsonl", action="store_true", help="print one JSON object per completion")
    _add_sampling_arguments(g, 128)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a checkpoint (R1 template, streamed; /reset, /exit)",
                       description="Interactive chat in the R1 template. The <think> part is shown dimmed.")
    _add_sampling_arguments(c, 256)
    c.set_defaults(func=cmd_chat)

    v = sub.add_parser("eval", help="held-out pass@1 / cons@k / response length on a task",
                       description="Samples k responses per held-out problem (R1 protocol: temperature 0.6, "
                                   "top-p 0.95); --temperature 0 for greedy.")
    v.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    v.add_argument("--task", required=True, help="chain_sum, basic_arithmetic, gsm_symbolic, countdown, syllogism")
    v.add_argument("--task-args", type=_json_object, default={}, metavar="JSON", help="generator options")
    v.add_argument("--n", type=int, default=100, help="held-out problems (default 100)")
    v.add_argument("--k", type=int, default=1, help="samples per problem (default 1)")
    v.add_argument("--temperature", type=float, default=0.6)
    v.add_argument("--top-p", type=float, default=0.95)
    v.add_argument("--max-new-tokens", type=int, default=128)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)


# The stage scripts: command, nanoseek.stages module and config class, handler, help, description.
STAGES = [
    ("pretrain", "pretrain:PretrainConfig", "cmd_pretrain",
     "pretrain a model (MLA + DeepSeekMoE + MTP) on the embedded corpus or --data",
     "DeepSeek-V3's pretraining recipe: AdamW, warm-up/constant/cosine/tail schedule, MTP, auxiliary-loss-free "
     "balancing; atomic checkpoints; --resume continues a killed run exactly; runs under torchrun for data and "
     "expert parallelism. Writes OUT/metrics.jsonl and OUT/checkpoints/step_N/."),
    ("grpo", "grpo:GRPOConfig", "cmd_grpo", "reinforcement learning with rule rewards (GRPO, Dr. GRPO, DAPO)",
     "R1-Zero-style RL: G samples per prompt, rule rewards (accuracy + format), group-normalised advantages, "
     "clipped objective, optional k3 KL. Writes OUT/metrics.jsonl and OUT/checkpoints/step_N/."),
    ("sample", "sample:SampleConfig", "cmd_sample", "rollouts to JSONL; --keep correct for rejection sampling",
     "k samples per problem; keeps verified-correct, well-formed completions (deduplicated) with provenance, or "
     "all of them with --keep all."),
    ("sft", "sft:SFTConfig", "cmd_sft", "supervised fine-tuning / distillation on traces",
     "Loss on completion tokens only; packed samples with sample masking; cosine schedule; optional logit "
     "distillation from --teacher."),
    ("speedrun", "speedrun:SpeedrunConfig", "cmd_speedrun", "the whole recipe end to end, ending in OUT/report.md",
     "pretrain → GRPO → rejection sampling → distillation → evaluation → report; finished stages are skipped, "
     "so an interrupted run resumes."),
]


def _add_stages(sub) -> None:
    import importlib

    for name, target, handler, help_text, description in STAGES:
        module, cls = target.split(":")
        config = getattr(importlib.import_module(f".stages.{module}", __package__), cls)
        p = sub.add_parser(name, help=help_text, description=description)
        add_config_arguments(p, config)
        p.set_defaults(func=globals()[handler])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 in small, tested PyTorch.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_model_tools(sub)
    _add_stages(sub)
    _add_inference_tools(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
