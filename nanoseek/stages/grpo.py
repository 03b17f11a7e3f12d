"""nanoseek grpo: R1-Zero-style reinforcement learning with rule-based rewards on verifiable tasks.

Top to bottom, per step: draw prompts → G samples each from the engine → rule rewards (accuracy + format) →
group-normalised advantages → μ updates of the clipped-ratio objective (+ β·k3 KL to a frozen reference) →
metrics → held-out pass@1 every N steps → checkpoint.

    nanoseek grpo --init runs/base --task chain_sum --out runs/rl --steps 60
    nanoseek grpo ... --algo dr-grpo        # no std scaling, constant normaliser (Dr. GRPO)
    nanoseek grpo ... --algo dapo           # clip-higher, token-level loss, dynamic sampling (DAPO)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..engine import Engine, SamplingParams, sequence_seed
from ..evaluation import evaluate
from ..losses import grpo_loss, group_advantages, token_logprobs
from ..optim import build_optimizer
from ..runtime import set_threads
from ..tasks import get_task
from ..tasks.base import combine
from ..template import STOP
from ..options import check_out_dir, own_run
from .common import MetricsLog, clear_run, load_checkpoint, save_step, write_run_json

ALGOS = {  # the settings each named recipe fixes (reference r1-grpo §2)
    "grpo": dict(scale_rewards=True, loss_norm="sequence", eps_high=0.2, beta=0.04, dynamic_sampling=False),
    "dr-grpo": dict(scale_rewards=False, loss_norm="constant", eps_high=0.2, beta=0.0, dynamic_sampling=False),
    "dapo": dict(scale_rewards=True, loss_norm="token", eps_high=0.28, beta=0.0, dynamic_sampling=True),
}


@dataclass
class GRPOConfig:
    init: str = field(metadata={"help": "starting checkpoint (a pretraining run directory or checkpoint)"})
    task: str = field(metadata={"help": "task family: chain_sum, basic_arithmetic, gsm_symbolic, countdown, syllogism"})
    out: str = field(metadata={"help": "run directory"})
    task_args: dict = field(default_factory=dict, metadata={"help": "generator options as JSON, e.g. {\"max_terms\": 2}"})
    algo: str = field(default="grpo", metadata={"help": "grpo, dr-grpo or dapo: sets the fields below unless given"})
    steps: int = field(default=60, metadata={"help": "RL steps (one rollout batch each)"})
    prompts_per_step: int = field(default=8, metadata={"help": "distinct prompts per step"})
    group_size: int = field(default=8, metadata={"help": "samples per prompt (G)"})
    max_new_tokens: int = field(default=96, metadata={"help": "response length limit"})
    temperature: float = field(default=1.0, metadata={"help": "rollout temperature"})
    top_p: float = field(default=1.0, metadata={"help": "rollout nucleus sampling"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate (constant after 5% warm-up)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    mu: int = field(default=1, metadata={"help": "policy updates per rollout batch (μ)"})
    micro_batch: int = field(default=16, metadata={"help": "sequences per forward pass in the update"})
    eps_low: float = field(default=0.2, metadata={"help": "clip ratio below 1 - eps_low"})
    eps_high: float = field(default=-1.0, metadata={"help": "clip ratio above 1 + eps_high (-1: the algo's)"})
    beta: float = field(default=-1.0, metadata={"help": "k3 KL coefficient; 0 = no reference model (-1: the algo's)"})
    loss_norm: str = field(default="", metadata={"help": "sequence, token or constant (empty: the algo's)"})
    scale_rewards: str = field(default="", metadata={"help": "std or none (empty: the algo's)"})
    dynamic_sampling: str = field(default="", metadata={"help": "on/off: drop groups whose rewards are all equal (empty: the algo's)"})
    ref_refresh: int = field(default=0, metadata={"help": "copy the policy into the reference every N steps (0: never)"})
    w_accuracy: float = field(default=1.0, metadata={"help": "reward weight of accuracy"})
    w_format: float = field(default=0.1, metadata={"help": "reward weight of the <think>/<answer> format"})
    partial_credit: float = field(default=0.0, metadata={"help": "TinyZero-style credit for a wrong but given answer"})
    eval_every: int = field(default=10, metadata={"help": "held-out greedy pass@1 every N steps"})
    eval_n: int = field(default=64, metadata={"help": "held-out problems per evaluation"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    seed: int = field(default=0, metadata={"help": "seed for problems and sampling"})
    max_seconds: float = field(default=0.0, metadata={"help": "stop after this wall time (0: run all --steps)"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0: all)"})
    force: bool = field(default=False, metadata={"help": "replace an earlier grpo run in --out instead of refusing"})


def resolve_algo(cfg: GRPOConfig) -> dict:
    """The effective settings: explicit flags override the named algorithm's."""
    if cfg.algo not in ALGOS:
        raise ValueError(f"--algo must be one of {', '.join(ALGOS)}, got {cfg.algo!r}")
    s = dict(ALGOS[cfg.algo])
    if cfg.eps_high >= 0:
        s["eps_high"] = cfg.eps_high
    if cfg.beta >= 0:
        s["beta"] = cfg.beta
    if cfg.loss_norm:
        s["loss_norm"] = cfg.loss_norm
    if cfg.scale_rewards:
        s["scale_rewards"] = {"std": True, "none": False}[cfg.scale_rewards]
    if cfg.dynamic_sampling:
        s["dynamic_sampling"] = {"on": True, "off": False}[cfg.dynamic_sampling]
    if s["loss_norm"] not in ("sequence", "token", "constant"):
        raise ValueError(f"--loss-norm must be sequence, token or constant, got {s['loss_norm']!r}")
    return s


def run(cfg: GRPOConfig) -> Path:
    settings = resolve_algo(cfg)
    set_threads(cfg.threads)
    out = Path(cfg.out)
    check_out_dir(out, "--out", own=own_run(out, "grpo"), force=cfg.force)
    task = get_task(cfg.task, **cfg.task_args)
    model, tokenizer = load_checkpoint(cfg.init)
    if cfg.force:  # only now that the inputs are known good
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_json(out, "grpo", {**dataclasses.asdict(cfg), "effective": settings})
    torch.manual_seed(cfg.seed)
    model.mtp.requires_grad_(False)  # RL trains the next-token policy; the MTP drafter stays as pretrained
    reference = copy.deepcopy(model).eval().requires_grad_(False) if settings["beta"] > 0 else None
    optimizer = build_optimizer(model, cfg.lr, weight_decay=0.0)
    engine, log = Engine(model, tokenizer), MetricsLog(out / "metrics.jsonl")
    heldout = task.problems(cfg.seed, cfg.eval_n, split="heldout")
    if cfg.eval_every:  # the starting point, before any update
        r = evaluate(engine, task, heldout, k=1, temperature=0, max_new_tokens=cfg.max_new_tokens)
        log.write({"step": 0, "heldout_accuracy": r["accuracy"], "heldout_format": r["format"]})
    bar = tqdm(range(cfg.steps), desc=f"grpo {cfg.task}", unit="step", dynamic_ncols=True)
    path, t_start = None, time.perf_counter()
    for step in bar:
        last = step + 1 == cfg.steps or (cfg.max_seconds and time.perf_counter() - t_start > cfg.max_seconds)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, round(0.05 * cfg.steps)))
        problems = task.problems(cfg.seed * 100_003 + step, cfg.prompts_per_step, split="train")
        batch, record = rollout(engine, task, problems, cfg, step)
        record.update(update(model, reference, optimizer, batch, cfg, settings))
        record["step"] = step + 1
        if cfg.ref_refresh and reference is not None and (step + 1) % cfg.ref_refresh == 0:
            reference.load_state_dict(model.state_dict())
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last:
            r = evaluate(engine, task, heldout, k=1, temperature=0, max_new_tokens=cfg.max_new_tokens)
            record.update(heldout_accuracy=r["accuracy"], heldout_format=r["format"])
        log.write(record)
        bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['accuracy']:.2f}",
                        held=f"{record.get('heldout_accuracy', float('nan')):.2f}")
        if (step + 1) % cfg.save_every == 0 or last:
            path = save_step(out, step + 1, model, tokenizer, {"stage": "grpo", "init": str(cfg.init)})
        if last:
            break
    return path


# ----------------------------------------------------------------------------- rollouts


def rollout(engine: Engine, task, problems, cfg: GRPOConfig, step: int):
    """G samples per prompt; returns the training batch and the rollout metrics."""
    tok = engine.tokenizer
    prompts = [task.prompt(p) for p in problems for _ in range(cfg.group_size)]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop=list(STOP))
    t0 = time.perf_counter()
    seeds = [sequence_seed(cfg.seed, step) * 4096 + i for i in range(len(prompts))]
    gens = engine.generate(prompts, params, seeds=seeds)
    rollout_s = time.perf_counter() - t0
    scores = [task.score(problems[i // cfg.group_size], g.text) for i, g in enumerate(gens)]
    rewards = torch.tensor([combine(s, cfg.w_accuracy, cfg.w_format, cfg.partial_credit) for s in scores])
    lengths = [len(g.tokens) for g in gens]
    record = {
        "reward": rewards.mean().item(), "accuracy": sum(s["accuracy"] for s in scores) / len(scores),
        "reward_accuracy": cfg.w_accuracy * sum(s["accuracy"] for s in scores) / len(scores),
        "reward_format": cfg.w_format * sum(s["format"] for s in scores) / len(scores),
        "response_len": sum(lengths) / len(lengths), "response_len_max": max(lengths),
        "rollout_tokens_per_s": sum(lengths) / rollout_s, "rollout_s": rollout_s,
        "truncated": sum(g.finish_reason == "length" for g in gens) / len(gens),
    }
    grouped = rewards.view(len(problems), cfg.group_size)
    record["frac_zero_std"] = (grouped.std(dim=1) == 0).float().mean().item()
    batch = {"prompts": [g.prompt_tokens for g in gens], "completions": [g.tokens for g in gens],
             "rewards": grouped, "pad": tok.pad_id}
    return batch, record


# ----------------------------------------------------------------------------- the update


def _pack(prompts: list[list[int]], completions: list[list[int]], pad: int):
    """Right-padded prompt+completion rows; inputs (B, L-1), targets (B, L-1), completion mask (B, L-1)."""
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    tokens = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p): len(p) + len(c)] = True
    return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


def completion_logprobs(model, inputs, targets, mask):
    """log p and entropy (B, T) of the targets, zero outside `mask`; the output head runs on masked positions only
    (prompts are most of each row, and their logits are never used)."""
    h = model.hidden(inputs)
    logp_sel, ent_sel = token_logprobs(model.head(h[mask]).unsqueeze(0), targets[mask].unsqueeze(0))
    logp = torch.zeros(mask.shape, dtype=logp_sel.dtype).masked_scatter(mask, logp_sel[0])
    ent = torch.zeros(mask.shape, dtype=ent_sel.dtype).masked_scatter(mask, ent_sel[0])
    return logp, ent


def _logprobs(model, inputs, targets, mask, micro: int, grad: bool):
    outs = []
    for i in range(0, inputs.shape[0], micro):
        with torch.set_grad_enabled(grad):
            outs.append(completion_logprobs(model, inputs[i:i + micro], targets[i:i + micro], mask[i:i + micro]))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def update(model, reference, optimizer, batch: dict, cfg: GRPOConfig, settings: dict) -> dict:
    """μ optimiser steps on one rollout batch; returns loss, KL, clip fraction, entropy, grad norm."""
    adv = group_advantages(batch["rewards"], scale_by_std=settings["scale_rewards"])
    keep = torch.ones_like(adv, dtype=torch.bool)
    if settings["dynamic_sampling"]:  # DAPO: groups with equal rewards carry no signal
        keep = (batch["rewards"].std(dim=1, keepdim=True) > 0).expand_as(adv)
    rows = keep.flatten().nonzero().flatten().tolist()
    if not rows:
        return {"loss": 0.0, "kept_groups": 0.0}
    inputs, targets, mask = _pack([batch["prompts"][i] for i in rows], [batch["completions"][i] for i in rows],
                                  batch["pad"])
    advantages = adv.flatten()[rows]
    micro = cfg.micro_batch
    model.train()
    old_logp = ref_logp = None
    if cfg.mu > 1:
        old_logp = _logprobs(model, inputs, targets, mask, micro, grad=False)[0]
    if reference is not None:
        ref_logp = _logprobs(reference, inputs, targets, mask, micro, grad=False)[0]
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    n_tok = mask.sum().clamp(min=1)
    for _ in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, len(rows), micro):
            sl = slice(i, i + micro)
            logp, ent = completion_logprobs(model, inputs[sl], targets[sl], mask[sl])
            old = old_logp[sl] if old_logp is not None else logp.detach()
            ref = ref_logp[sl] if ref_logp is not None else None
            loss, s = grpo_loss(logp, old, advantages[sl], mask[sl], cfg.eps_low, settings["eps_high"],
                                settings["beta"], ref, settings["loss_norm"], cfg.max_new_tokens)
            share = mask[sl].sum() / n_tok if settings["loss_norm"] == "token" else logp.shape[0] / len(rows)
            (loss * share).backward()
            stats["loss"] += loss.item() * float(share) / cfg.mu
            stats["kl"] += s["kl"] * float(share) / cfg.mu
            stats["clip_frac"] += s["clip_frac"] * float(share) / cfg.mu
            stats["entropy"] += ((ent * mask[sl]).sum() / n_tok).item() / cfg.mu
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   cfg.grad_clip).item()
        if math.isfinite(grad_norm):
            optimizer.step()
        stats["grad_norm"] += grad_norm / cfg.mu
    model.eval()
    stats["kept_groups"] = keep[:, 0].float().mean().item()
    return stats
