"""Greedy-token parity of `nanoseek export --to gguf` in llama.cpp (issue #40 item 4).

Our model and llama.cpp (through llama-cpp-python) complete the same prompts greedily from the same weights for
the same number of tokens, eos ignored, and each reads our prompt + completion teacher-forced: reported as in
bench/vllm_parity.py (greedy prefix agreement, where it first diverges and our top-1/top-2 margin there, teacher-
forced top-1 agreement, the largest |Δ log p| of our token). The prompts are token ids, so the check is the
model's; `--text` also compares llama.cpp's tokenization of a chat prompt with ours.

llama-cpp-python is built from source (PyPI ships no wheel) in its own virtual environment beside the repository;
`--setup` makes it, or says in one line why it cannot (a C++ compiler and cmake are needed; ~10 min on 2 cores):

    python bench/gguf_parity.py --setup                           # ../llama-venv
    python bench/gguf_parity.py --ckpt runs/speedrun/rl           # a trained checkpoint, its own weights
    python bench/gguf_parity.py --ckpt runs/speedrun/rl --preset small --random \\
        --model-overrides '{"kv_lora_rank": 512, "qk_rope_head_dim": 64}'   # random weights, DeepSeek's latent

The llama.cpp half runs this same file under that environment's python (`--worker IN OUT`, JSON in and out).
Last line: greedy_match=… teacher_top1=… max_abs_dlogp=… tokenization=…
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
DEFAULT_VENV = Path(os.environ.get("NANOSEEK_LLAMA_VENV", REPO.parent / "llama-venv"))
LLAMA_SPEC = "llama-cpp-python==0.3.36"


def setup(venv: Path) -> str | None:
    """Create `venv` with llama-cpp-python built for this CPU; None on success, else why not (one line)."""
    if not (venv / "bin" / "python").exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode:
            return f"cannot create {venv}: {(made.stderr.strip().splitlines() or ['?'])[-1]}"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
           "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"}
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-compile", LLAMA_SPEC],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        return f"pip install {LLAMA_SPEC} failed in {venv}: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


# ----------------------------------------------------------------------------- the llama.cpp half (its python)


def worker(inp: str, out: str) -> None:
    """Greedy completions, teacher-forced argmaxes and log-probs from llama.cpp, as JSON."""
    import numpy as np
    from llama_cpp import Llama

    job = json.loads(Path(inp).read_text())
    # the KV cache in fp32 where asked (--kv-f32): llama.cpp's default keeps it in f16, so every key and latent
    # is rounded to f16 once (GGML type 0 is F32, 1 is F16)
    kv = {"type_k": 0, "type_v": 0} if job["kv_f32"] else {}
    llm = Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"], n_threads=1, logits_all=True,
                seed=0, verbose=False, **kv)
    tokens, top1, logp = [], [], []
    for p, seq in zip(job["prompts"], job["sequences"]):
        llm.reset()
        llm.eval(p)
        got = []
        for _ in range(job["max_new_tokens"]):  # argmax by hand: eos ignored, no sampler in between
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(t)
            llm.eval([t])
        tokens.append(got)
        llm.reset()
        llm.eval(seq)
        z = llm.scores[: len(seq) - 1].astype(np.float64)
        lp = z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) + z.max(-1, keepdims=True))
        top1.append(lp.argmax(-1).tolist())
        logp.append([float(lp[i, seq[i + 1]]) for i in range(len(seq) - 1)])
    text = [llm.tokenize(s.encode(), add_bos=False, special=True) for s in job["texts"]]
    Path(out).write_text(json.dumps({"tokens": tokens, "top1": top1, "logp": logp, "text_tokens": text}))


# ----------------------------------------------------------------------------- our half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python bench/gguf_parity.py --ckpt runs/speedrun/rl",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="build llama-cpp-python in its environment and exit")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"llama.cpp's environment (default {DEFAULT_VENV})")
    ap.add_argument("--ckpt", help="a nanoseek checkpoint (its tokenizer is always used)")
    ap.add_argument("--random", action="store_true", help="random weights of --preset instead of the checkpoint's")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model-overrides", default="{}", help="JSON of ModelConfig fields for the random model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--kv-f32", action="store_true", help="llama.cpp's KV cache in fp32 (its default is f16)")
    ap.add_argument("--worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.setup or not (args.venv / "bin" / "python").exists():
        why = setup(args.venv)
        if why:
            print(f"SKIP: llama.cpp unavailable: {why}\ngreedy_match=skip")
            return
        if args.setup:
            print(f"llama.cpp environment ready: {args.venv}")
            return
    if not args.ckpt:
        ap.error("--ckpt is needed (its tokenizer goes into the GGUF file)")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    run(args)


def _model(args):
    import torch

    from nanoseek import checkpoint
    from nanoseek.config import get_preset
    from nanoseek.generations import build_model

    tok = checkpoint.resolve(args.ckpt) / "tokenizer.json"
    if not args.random:
        return checkpoint.load(args.ckpt)[0].eval(), tok
    from nanoseek.tokenizer import Tokenizer

    torch.manual_seed(args.seed)
    cfg = get_preset(args.preset, vocab_size=Tokenizer.load(tok).vocab_size, **json.loads(args.model_overrides))
    model = build_model(cfg)
    model.init_weights(0.05)
    with torch.no_grad():  # non-zero routing biases, so that exp_probs_b matters
        for name, buf in model.named_buffers():
            if name.endswith("gate.bias"):
                buf.normal_(0, 0.05)
    return model.eval(), tok


def run(args) -> None:
    import torch

    from nanoseek.gguf_export import save_gguf
    from nanoseek.template import r1_prompt
    from nanoseek.tokenizer import Tokenizer
    from vllm_parity import compare, ours, prompts_for

    torch.set_num_threads(1)
    model, tok_file = _model(args)
    tok = Tokenizer.load(tok_file)
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "model.gguf"
    save_gguf(model, path, tok_file)
    prompts = prompts_for(model, args.prompts, args.prompt_len, args.seed)
    mine, my_logp, margin = ours(model, prompts, args.max_new)
    sequences = [p + t for p, t in zip(prompts, mine)]
    texts = [r1_prompt("State the final answer to the following arithmetic problem: 4 - 9 - 4 - 5 =")]
    job = {"model": str(path), "prompts": prompts, "sequences": sequences, "max_new_tokens": args.max_new,
           "n_ctx": max(map(len, sequences)) + 8, "texts": texts, "kv_f32": args.kv_f32}
    inp, out = Path(tmp.name) / "in.json", Path(tmp.name) / "out.json"
    inp.write_text(json.dumps(job))
    cfg = model.cfg
    print(f"model: {args.preset + ' (random)' if args.random else args.ckpt} kv_lora_rank={cfg.kv_lora_rank} "
          f"qk_rope_head_dim={cfg.qk_rope_head_dim} layers={cfg.n_layers} experts={cfg.n_routed_experts}; "
          f"{len(prompts)} prompts, {args.max_new} tokens; GGUF {path.stat().st_size / 1e6:.1f} MB; llama.cpp KV cache "
          f"{'f32' if args.kv_f32 else 'f16 (its default)'}")
    r = subprocess.run([str(args.venv / "bin" / "python"), __file__, "--worker", str(inp), str(out)],
                       capture_output=True, text=True)
    if r.returncode:
        print(f"llama.cpp failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}\ngreedy_match=fail")
        sys.exit(1)
    theirs = json.loads(out.read_text())
    row = compare("llama.cpp", theirs, mine, prompts, sequences, my_logp, margin)
    same_tok = all(a == tok.encode(t) for a, t in zip(theirs["text_tokens"], texts))
    print(f"llama.cpp's tokenization of an R1 chat prompt equals ours: {same_tok}")
    print(f"greedy_match={row['greedy_match']:.3f} teacher_top1={row['teacher_top1']:.3f} "
          f"max_abs_dlogp={row['max_abs_dlogp']:.2g} tokenization={'same' if same_tok else 'differs'}")


if __name__ == "__main__":
    main()
