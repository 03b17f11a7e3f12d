"""nanoseek generate / chat: text from a checkpoint through the latent-cache engine.

    nanoseek generate --ckpt runs/base --prompt "The capital of France is"
    nanoseek generate --ckpt runs/rl --template r1 --temperature 0 \
        --prompt "State the final answer to the following arithmetic problem: 3 + 4 - 1 + 2 ="
    nanoseek chat --ckpt runs/rl            # the R1 template, streamed, the <think> part dimmed; starts by
                                            # naming the task runs/rl trained on, with an example question

Only the generated text goes to stdout (one completion per prompt, each under a `=== prompt i of n ===` header
when there are several; --jsonl for one JSON object per line); speed and acceptance go to stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from ..checkpoint import load
from ..engine import Engine, SamplingParams
from ..evaluation import R1_SAMPLING, trained_on
from ..options import ComputeOptions, check, option
from ..runtime import prepare_inference, resolve, set_threads

# The engine's library defaults, except temperature and top-p: a trained reasoning model is sampled at R1's
# setting everywhere (evaluation.R1_SAMPLING), so what chat shows is what eval scored.
_DEFAULTS = {**{f.name: f.default for f in fields(SamplingParams) if f.name != "stop"}, **R1_SAMPLING._asdict()}


@dataclass(kw_only=True)
class SamplingOptions(ComputeOptions):
    ckpt: str = option(help="checkpoint directory, or a run directory (its latest checkpoint)")
    max_new_tokens: int = option(_DEFAULTS["max_new_tokens"], help="tokens to generate at most (lowered, with a "
                                 "note, when the model's context has less room)", min=1)
    temperature: float = option(_DEFAULTS["temperature"], help="sampling temperature (default: "
                                f"{R1_SAMPLING.temperature}, R1's evaluation setting); 0 = greedy", min=0)
    top_p: float = option(_DEFAULTS["top_p"], help=f"nucleus sampling mass (default: {R1_SAMPLING.top_p}, R1's "
                          "evaluation setting); 1 = off", above=0, max=1)
    top_k: int = option(_DEFAULTS["top_k"], help="keep the k most likely tokens (0 = off)", min=0)
    seed: int = option(_DEFAULTS["seed"], help="sampling seed", min=0)
    stop: list[str] = option(default_factory=list, help="stop when any of these strings is generated", metavar="TEXT")
    speculative: bool = option(False, help="MTP speculative decoding (needs a checkpoint with an MTP module)")

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed, stop=list(self.stop))


@dataclass(kw_only=True)
class GenerateConfig(SamplingOptions):
    """Complete one or more prompts; stdout gets only the completions."""

    prompt: list[str] = option(default_factory=list, help="one or more prompts", metavar="TEXT")
    prompt_file: str = option("", help="UTF-8 file with one prompt per line")
    template: str = option("none", help="r1: wrap each prompt in the R1 reasoning template; none: raw "
                           "continuation", choices=("none", "r1"))
    jsonl: bool = option(False, help="print one JSON object per completion (text, finish_reason)")

    def __post_init__(self):
        check(self)


@dataclass(kw_only=True)
class ChatConfig(SamplingOptions):
    """Interactive chat in the R1 template: the reply streams as it is generated, its <think> part dimmed.
    It starts by naming the task the checkpoint's run recorded (run.json) with an example question in that task's
    format (/example asks it). Ctrl-C stops the current reply; Ctrl-D (or /exit) leaves; /help lists the
    commands."""

    def __post_init__(self):
        check(self)


def load_for_inference(cfg: SamplingOptions, rows: int = 1):
    """(model, tokenizer, runtime): the checkpoint in the compute precision on the chosen device; `auto`
    precision is measured at `rows`, the sequences decoded together."""
    set_threads(cfg.threads)
    model, tokenizer = load(cfg.ckpt, require_tokenizer=True)
    rt = resolve(cfg.device, cfg.precision, rows=rows)
    return prepare_inference(model, rt).eval(), tokenizer, rt


def fit_context(params: SamplingParams, prompt_lens: list[int], context: int, speculative: bool) -> SamplingParams:
    """Lower max_new_tokens (saying so) when the longest prompt leaves less room in the model's context."""
    room = context - max(prompt_lens) - (2 if speculative else 0)
    if room < 1:
        raise ValueError(f"a prompt of {max(prompt_lens)} tokens leaves no room in the model's context of "
                         f"{context} tokens")
    if params.max_new_tokens > room:
        print(f"note: --max-new-tokens lowered from {params.max_new_tokens} to {room} to fit the model's context "
              f"of {context} tokens", file=sys.stderr)
        params.max_new_tokens = room
    return params


def _read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompt_file:
        try:
            text = Path(cfg.prompt_file).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {cfg.prompt_file}: not UTF-8 text (byte {e.start})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompt-file FILE (one prompt per line)")
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt: empty prompt")
    if cfg.template == "r1":
        from ..template import r1_prompt

        prompts = [r1_prompt(p) for p in prompts]
    return prompts


def generate(cfg: GenerateConfig) -> None:
    prompts = _read_prompts(cfg)
    model, tokenizer, _ = load_for_inference(cfg, rows=len(prompts))
    if cfg.speculative and model.cfg.n_mtp_layers == 0:
        raise ValueError(f"--speculative: {cfg.ckpt} has no MTP module (n_mtp_layers = 0)")
    ids = [tokenizer.encode(p) for p in prompts]
    params = fit_context(cfg.sampling(), [len(i) for i in ids], model.cfg.max_seq_len, cfg.speculative)
    outs = Engine(model, tokenizer).generate(ids, params, speculative=cfg.speculative)
    for i, g in enumerate(outs):
        if cfg.jsonl:
            print(json.dumps({"text": g.text, "finish_reason": g.finish_reason}))
        elif len(outs) > 1:  # several completions: each under a header naming its prompt, so they can be told apart
            print(f"{'' if i == 0 else chr(10)}=== prompt {i + 1} of {len(outs)} ===\n{g.text}")
        else:
            print(g.text)
    st = outs.stats
    extra = f", draft acceptance {st.acceptance:.1%}" if cfg.speculative else ""
    print(f"[{len(outs)} prompt(s), {st.tokens} tokens in {st.seconds:.2f}s = {st.tokens_per_s:.1f} tokens/s{extra}]",
          file=sys.stderr)


def chat(cfg: ChatConfig) -> None:
    from ..chat import chat as chat_loop

    model, tokenizer, _ = load_for_inference(cfg)
    if cfg.speculative and model.cfg.n_mtp_layers == 0:
        raise ValueError(f"--speculative: {cfg.ckpt} has no MTP module (n_mtp_layers = 0)")
    chat_loop(model, tokenizer, cfg.sampling(), speculative=cfg.speculative, trained_on=trained_on(cfg.ckpt))
