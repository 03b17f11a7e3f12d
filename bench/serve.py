"""Serving throughput and latency: `nanoseek serve` (continuous batching) vs the same server with --max-batch 1 vs
`vllm serve` (vLLM's CPU engine) and `transformers serve` on the same exported weights, same prompts, lengths and
precision, in one run.

N concurrent clients (the `openai` async client) stream greedy chat completions of at most --max-tokens tokens
(stop strings </answer> and "\\nUser:", as nanoseek's chat template stops) for chain-sum questions, at
concurrency 1, 8 and 32. Output tokens/s counts the servers' own usage numbers over the wall time of each level;
time to first token (TTFT) is from sending the request to the first text chunk; inter-token latency (ITL) is
the gap between successive text chunks. Each server runs as its own process with --threads torch threads;
transformers serve gets the same thread count through OMP_NUM_THREADS and a chat template that renders
nanoseek's (checked to give the same prompt). vLLM serves the directory `nanoseek export --to hf` writes (its chat
template is ours), from its own virtual environment (bench/vllm_parity.py --setup makes it; skipped with the reason
when it is missing), with --threads OpenMP threads, `VLLM_MLA_DISABLE=1` unless the latent is the 576 wide one its
CPU MLA kernel takes (docs/results/vllm.md). Each competitor's completion texts are compared with ours.

    python bench/serve.py --ckpt runs/small [--out docs/results/serve.md]

Last line: tokens_per_s_c32=… batching_speedup=… transformers_serve_tokens_per_s_c32=… ratio=… ttft_p99_ms=…
vllm_tokens_per_s_c32=… vllm_ttft_p99_ms=… ratio_vllm=…
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import publish  # noqa: E402
from nanoseek.template import CHAT_STOP, conversation  # noqa: E402

LEVELS = (1, 8, 32)
# requests per level: three waves of the concurrency (at least 16), so that a level lasts seconds, not one wave
N_REQUESTS = {c: max(16, 3 * c) for c in LEVELS}

# nanoseek's chat template (template.conversation) in Jinja, for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(pre='') -%}"
    "{%- for m in messages %}{% if m.role == 'system' %}{% set ns.pre = (m.content | trim) + '\\n' %}{% endif %}"
    "{% endfor -%}"
    "{{ ns.pre }}"
    "{%- for m in messages if m.role != 'system' %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{%- if m.role == 'user' %}{{ 'User: ' + (m.content | trim) }}"
    "{%- elif m.role == 'assistant' %}{{ 'Assistant: <think> </think> <answer> ' + (m.content | trim) + "
    "' </answer>' }}{% endif %}"
    "{%- endfor %}{{ '\\nAssistant: <think>' }}"
)


def questions(n: int) -> list[list[dict]]:
    """n chat requests: chain-sum questions of the kind the model was trained on (deterministic)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        terms = rng.integers(1, 50, size=int(rng.integers(3, 6))).tolist()
        out.append([{"role": "user", "content": "What is " + " + ".join(map(str, terms)) + "?"}])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, limit: float = 300) -> None:
    """Until `url` answers /v1/models (RuntimeError with the log's tail if the server dies or `limit` s pass)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server not ready after {limit}s:\n{log.read_text()[-3000:]}")


class Server:
    """A server subprocess (its log in a temp file), stopped with Ctrl-C at the end of the block."""

    def __init__(self, cmd: list[str], threads: int, log: Path, env: dict | None = None, ready_s: float = 300):
        self.port, self.ready_s = free_port(), ready_s
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env or {})}
        self.log = log

    def __enter__(self) -> "Server":
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_ready(self.url, self.proc, self.log, self.ready_s)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is not None:
            self.out.close()
            return
        self.proc.send_signal(2)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


async def one(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stop=CHAT_STOP, stream=True,
                                                  stream_options={"include_usage": True})
    first = last = None
    gaps, tokens, text = [], None, ""
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            piece = (c.delta.content or "") + ((c.delta.model_extra or {}).get("reasoning_content") or "")
            if piece:
                text += piece
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    return {"ttft": (first or time.perf_counter()) - t0, "gaps": gaps, "tokens": tokens, "text": text}


async def level(url: str, model: str, prompts: list, concurrency: int, max_tokens: int) -> dict:
    """Run `prompts` with `concurrency` clients; throughput, TTFT and ITL percentiles."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1800)
    todo, results = list(enumerate(prompts)), {}

    async def worker():
        while todo:
            i, messages = todo.pop(0)
            results[i] = await one(client, model, messages, max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    runs = [results[i] for i in range(len(prompts))]
    ttft = np.array([r["ttft"] for r in runs]) * 1000
    itl = np.array([g for r in runs for g in r["gaps"]] or [0.0]) * 1000
    tokens = sum(r["tokens"] or 0 for r in runs)
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "requests": len(runs), "wall_s": wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "itl_p50": float(np.percentile(itl, 50)), "itl_p99": float(np.percentile(itl, 99)),
            "texts": [r["text"] for r in runs]}


def measure(server: Server, model: str, requests: dict, max_tokens: int) -> dict:
    asyncio.run(level(server.url, model, questions(2), 2, 8))  # warm-up
    return {c: asyncio.run(level(server.url, model, requests[c], c, max_tokens)) for c in LEVELS}


def export_for_transformers(ckpt: Path, out: Path, dtype) -> None:
    """save_hf weights plus a tokenizer transformers loads, with nanoseek's chat template."""
    from transformers import PreTrainedTokenizerFast

    from nanoseek import load
    from nanoseek.hf import save_hf

    model, tok = load(ckpt, dtype)
    save_hf(model, out)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.tk, eos_token="<|eos|>", bos_token="<|bos|>",
                                     pad_token="<|pad|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    messages = questions(1)[0]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == conversation(messages), (rendered, conversation(messages))


def table(name: str, r: dict) -> list[str]:
    return [f"| {name} | {c} | {r[c]['tokens_per_s']:.1f} | {r[c]['ttft_p50']:.0f} | {r[c]['ttft_p99']:.0f} | "
            f"{r[c]['itl_p50']:.1f} | {r[c]['itl_p99']:.1f} | {r[c]['tokens']} |" for c in LEVELS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="nanoseek checkpoint (with tokenizer.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--transformers-batching", default="auto", choices=["auto", "on", "off"],
                    help="transformers serve --continuous-batching (auto: use it if it serves, else sequential)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--vllm-venv", default=None, help="vLLM's virtual environment (default: bench/vllm_parity.py's)")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--texts", default=None, metavar="JSON",
                    help="also write every server's completion texts here (to see where two servers differ)")
    args = ap.parse_args()
    import torch

    from nanoseek.checkpoint import resolve

    ckpt = resolve(args.ckpt)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    requests = {c: questions(N_REQUESTS[c]) for c in LEVELS}
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ours_cmd = [sys.executable, "-m", "nanoseek", "serve", "--ckpt", str(ckpt), "--port", "{port}", "--threads",
                str(args.threads), "--precision", args.precision, "--model-name", "m"]
    results = {}
    with Server(ours_cmd + ["--max-batch", "32"], args.threads, work / "ours.log") as s:
        results["nanoseek serve"] = measure(s, "m", requests, args.max_tokens)
    with Server(ours_cmd + ["--max-batch", "1"], args.threads, work / "ours-b1.log") as s:
        results["nanoseek serve --max-batch 1"] = measure(s, "m", requests, args.max_tokens)
    vllm_note = "not run (--skip-vllm)"
    if not args.skip_vllm:
        vllm_note, vl = run_vllm(ckpt, work, args, requests)
        if vl is not None:
            results["vllm serve"] = vl
    hf_note = "not run (--skip-transformers)"
    if not args.skip_transformers:
        hf_note, hf = run_transformers(ckpt, work, dtype, args, requests)
        if hf is not None:
            results["transformers serve"] = hf
    if args.texts:
        Path(args.texts).write_text(json.dumps({name: {c: r[c]["texts"] for c in LEVELS} for name, r in results.items()},
                                               indent=1))
    report(results, hf_note, vllm_note, ckpt, args, work)
    shutil.rmtree(work, ignore_errors=True)


def run_transformers(ckpt: Path, work: Path, dtype, args, requests) -> tuple[str, dict | None]:
    """transformers serve on the exported weights: with continuous batching if it works, else sequential."""
    hf_dir = work / "hf"
    export_for_transformers(ckpt, hf_dir, dtype)
    cli = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    modes = {"on": [True], "off": [False], "auto": [True, False]}[args.transformers_batching]
    errors = []
    for cb in modes:
        cmd = [cli, "serve", str(hf_dir), "--port", "{port}", "--host", "127.0.0.1", "--device", "cpu", "--dtype",
               "float32" if dtype.is_floating_point and dtype.itemsize == 4 else "bfloat16"]
        cmd += ["--continuous-batching"] if cb else []
        log = work / f"transformers-cb{int(cb)}.log"
        try:
            with Server(cmd, args.threads, log, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as s:
                r = measure(s, str(hf_dir), requests, args.max_tokens)
            if not any(t for c in LEVELS for t in r[c]["texts"]):
                raise RuntimeError("served empty completions")
            if cb:
                return "transformers serve --continuous-batching", r
            failed = f"; --continuous-batching failed: {'; '.join(errors)}" if errors else ""
            return f"transformers serve (sequential generate{failed})", r
        except Exception as e:  # report exactly why (the server's own last error line), and try the next mode
            logged = [line for line in log.read_text().splitlines() if "Error" in line] if log.exists() else []
            errors.append(logged[-1].strip()[:300] if logged else f"{type(e).__name__}: {str(e).strip()[-300:]}")
    return "transformers serve could not be run: " + "; ".join(errors), None


def run_vllm(ckpt: Path, work: Path, args, requests) -> tuple[str, dict | None]:
    """vllm serve on what `nanoseek export --to hf` writes, from vLLM's own environment."""
    from vllm_parity import DEFAULT_VENV

    venv = Path(args.vllm_venv or DEFAULT_VENV)
    python = venv / "bin" / "python"
    if not python.exists():
        return f"not run: no vLLM environment at {venv} (python bench/vllm_parity.py --setup)", None
    out = work / "export"
    exported = subprocess.run([sys.executable, "-m", "nanoseek", "export", "--ckpt", str(ckpt), "--to", "hf", str(out)],
                              capture_output=True, text=True)
    if exported.returncode:
        return f"not run: nanoseek export failed: {(exported.stderr.strip().splitlines() or ['?'])[-1]}", None
    config = json.loads((out / "config.json").read_text())
    mla = config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576  # the only latent vLLM's CPU MLA kernel takes
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
           **({} if mla else {"VLLM_MLA_DISABLE": "1"})}
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(out), "--served-model-name", "m",
           "--dtype", "float32" if args.precision == "fp32" else "bfloat16", "--max-model-len",
           str(config["max_position_embeddings"]), "--max-num-seqs", "32", "--host", "127.0.0.1", "--port", "{port}"]
    log = work / "vllm.log"
    try:  # vLLM compiles its model at start-up: minutes on a small CPU
        with Server(cmd, args.threads, log, env=env, ready_s=1800) as s:
            r = measure(s, "m", requests, args.max_tokens)
    except Exception as e:
        logged = [line for line in log.read_text().splitlines() if "Error" in line] if log.exists() else []
        return "vllm serve could not be run: " + (logged[-1].strip()[:300] if logged else f"{type(e).__name__}: "
                                                   f"{str(e).strip()[-300:]}"), None
    attention = "its CPU MLA kernel" if mla else "VLLM_MLA_DISABLE=1 (plain attention over expanded K/V)"
    return f"vllm serve (vllm-cpu, {attention})", r


def visible(text: str, specials: list[str]) -> str:
    """A completion as a reader sees it: without special tokens and whitespace. vLLM and transformers serve drop
    special tokens when they detokenize (skip_special_tokens, their default; `<think>` and `</answer>` are special
    here), and our server splits the reasoning off at them, so the same tokens come back spaced differently."""
    return re.sub("|".join(map(re.escape, specials)) + r"|\s+", "", text)


def same_text(a: dict, b: dict, specials: list[str]) -> float:
    """The fraction of requests, over every level, whose completions agree (special tokens and spacing aside)."""
    return float(np.mean([visible(x, specials) == visible(y, specials)
                          for c in LEVELS for x, y in zip(a[c]["texts"], b[c]["texts"])]))


def report(results: dict, hf_note: str, vllm_note: str, ckpt: Path, args, work: Path) -> None:
    ours, b1 = results["nanoseek serve"], results["nanoseek serve --max-batch 1"]
    hf = results.get("transformers serve")
    added = json.loads((ckpt / "tokenizer.json").read_text()).get("added_tokens", [])
    specials = [t["content"] for t in added if t.get("special")]
    lines = [f"checkpoint: {ckpt}; greedy chat completions of at most {args.max_tokens} tokens (stop: </answer>, "
             f"\\nUser:); {args.precision}; {args.threads} torch thread(s) per server; requests per level: "
             f"{', '.join(f'c{c}: {N_REQUESTS[c]}' for c in LEVELS)}; competitors: {vllm_note}; {hf_note}", "",
             "| server | concurrency | output tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
             "tokens |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines += table(name, r)
    speedup = ours[32]["tokens_per_s"] / b1[32]["tokens_per_s"]
    same = np.mean([a == b for c in LEVELS for a, b in zip(ours[c]["texts"], b1[c]["texts"])])
    lines += ["", f"Same completion text with and without batching: {same:.0%} of requests."]
    hf_c32 = hf[32]["tokens_per_s"] if hf else float("nan")
    if hf:
        lines.append(f"Same completion text as transformers serve (special tokens and spacing aside): "
                     f"{same_text(ours, hf, specials):.0%} of requests.")
    vl = results.get("vllm serve")
    vl_c32, vl_ttft = (vl[32]["tokens_per_s"], vl[32]["ttft_p99"]) if vl else (float("nan"), float("nan"))
    if vl:
        lines.append(f"Same completion text as vllm serve (special tokens and spacing aside): "
                     f"{same_text(ours, vl, specials):.0%} of requests.")
    headline = (f"tokens_per_s_c32={ours[32]['tokens_per_s']:.1f} batching_speedup={speedup:.2f} "
                f"transformers_serve_tokens_per_s_c32={hf_c32:.1f} ratio={ours[32]['tokens_per_s'] / hf_c32:.2f} "
                f"ttft_p99_ms={ours[32]['ttft_p99']:.0f} vllm_tokens_per_s_c32={vl_c32:.1f} "
                f"vllm_ttft_p99_ms={vl_ttft:.0f} ratio_vllm={ours[32]['tokens_per_s'] / vl_c32:.2f}")
    publish("bench/serve.py", lines, headline, args.out)


if __name__ == "__main__":
    main()
