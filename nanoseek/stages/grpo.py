"""nanoseek grpo: R1-Zero-style reinforcement learning with rule-based rewards on verifiable tasks.

Top to bottom, per step: fresh training problems → G samples each from the engine → rule rewards → group
advantages → μ updates of the clipped-ratio objective (+ β·k3 KL to the frozen initial policy) → diagnostics →
metrics → held-out pass@1 every N steps → checkpoint.

    nanoseek grpo --init runs/base --task chain_sum --out runs/rl --steps 60
    nanoseek grpo ... --algo dr-grpo        # no std scaling, constant normaliser (Dr. GRPO)
    nanoseek grpo ... --algo dapo           # clip-higher, token-level loss, dynamic sampling (DAPO)

What keeps the loop on-policy and honest:
- Problems: one `ProblemStream` per run, so every step's prompts are questions no earlier step used (until the
  training split runs out; `problems_repeated` counts any repeat), and only training-split questions.
- Learning rate: linear warm-up over --warmup-steps, then constant. Nothing reads --steps, so a run stopped by
  --max-seconds trains at the same rates as one that runs to the end; the rate used is logged every step.
- The update scores tokens under softmax(logits / T) at the rollout temperature T, the distribution the
  engine sampled from (top-p < 1 is not corrected: its renormalisation shows in `logp_gap_abs_mean`).
- KL(π || π_init) to the frozen initial policy is logged for every algorithm (β = 0 only leaves it out of the
  loss): one no-grad forward of the reference, measured at ~15% of a `small` step (`reference_s`), every step
  by default (--kl-every). `kl_rollout` is the KL between the rollout engine's and the update's distributions
  on the sampled tokens (their numerical mismatch; bf16 rollouts raise it).
- Diagnostics per step: reward components, the share of groups with equal rewards (no gradient) and of groups
  that differ only by format, clip fractions, entropy, ratio ranges, the rollout-vs-update log-prob gap and
  importance ratios, and the MoE routing mismatch between rollout and update. --routing-replay reuses the
  rollout's experts in the update (Rollout Routing Replay, arXiv 2510.11370); --tis-cap C weights tokens by
  min(π_update / π_rollout, C) (truncated importance sampling).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import Engine, SamplingParams, sequence_seed
from ..errors import Interrupted
from ..evaluation import evaluate
from ..losses import grpo_loss, group_advantages, k3_kl
from ..model import MoE
from ..optim import build_optimizer
from ..rollouts import completion_logprobs, pack_completions
from ..stats import forward_flops_per_token
from ..options import ComputeOptions, check, check_out_dir, option, own_run
from ..runtime import prepare_for_training, prepare_inference, resolve, set_threads
from ..tasks import TASKS, get_task
from ..tasks.base import combine
from ..template import STOP
from . import resume
from .common import MetricsLog, StopRequest, clear_run, load_checkpoint, write_run_json
from .progress import StageBar

ALGOS = {  # the settings each named recipe fixes
    "grpo": dict(scale_rewards="group", loss_norm="sequence", eps_high=0.2, beta=0.04, dynamic_sampling=False),
    "dr-grpo": dict(scale_rewards="none", loss_norm="constant", eps_high=0.2, beta=0.0, dynamic_sampling=False),
    "dapo": dict(scale_rewards="group", loss_norm="token", eps_high=0.28, beta=0.0, dynamic_sampling=True),
}


@dataclass(kw_only=True)
class GRPOConfig(ComputeOptions):
    """R1-Zero-style RL with rule-based rewards (GRPO, Dr. GRPO, DAPO) from a checkpoint on a verifiable task.
    Writes OUT/metrics.jsonl (per step: lr, rewards, diagnostics, held-out pass@1), OUT/heldout.jsonl and
    OUT/checkpoints/step_N/."""

    init: str = option("", help="starting checkpoint, a pretraining run directory or checkpoint (default: none; "
                       "required unless --resume)")
    task: str = option("", help=f"task family: {', '.join(TASKS)} (default: none; required unless --resume)")
    out: str = option(help="run directory")
    task_args: dict = option(default_factory=dict, help='generator options as JSON, e.g. {"max_terms": 2}')
    algo: str = option("grpo", help="named recipe: sets eps-high, beta, loss-norm, scale-rewards and "
                       "dynamic-sampling unless given", choices=tuple(ALGOS))
    steps: int = option(60, help="RL steps (one rollout batch each)", min=1)
    prompts_per_step: int = option(8, help="distinct prompts per step", min=1)
    group_size: int = option(8, help="samples per prompt (G)", min=2)
    max_new_tokens: int = option(96, help="response length limit", min=1)
    temperature: float = option(1.0, help="rollout temperature (the update scores tokens at it)", above=0)
    top_p: float = option(1.0, help="rollout nucleus sampling (< 1 is off-policy, uncorrected)", above=0, max=1)
    lr: float = option(1e-4, help="learning rate (constant after --warmup-steps)", above=0)
    warmup_steps: int = option(5, help="linear warm-up steps (independent of --steps)", min=0)
    grad_clip: float = option(1.0, help="gradient-norm clip", above=0)
    mu: int = option(1, help="passes over each rollout batch (μ)", min=1)
    minibatches: int = option(1, help="optimiser steps per pass, each on its share of the batch's groups (R1: 16; "
                              "more than 1 makes the clip act)", min=1)
    micro_batch: int = option(16, help="sequences per forward pass in the update", min=1)
    eps_low: float = option(0.2, help="clip the ratio below 1 - eps_low", min=0, below=1)
    eps_high: float = option(-1.0, help="clip the ratio above 1 + eps_high (-1: the algo's)", min=-1)
    beta: float = option(-1.0, help="k3 KL coefficient in the loss (-1: the algo's)", min=-1)
    loss_norm: str = option("", help="sequence, token or constant (empty: the algo's)",
                            choices=("", "sequence", "token", "constant"))
    scale_rewards: str = option("", help="advantage std: group, batch or none (empty: the algo's)",
                                choices=("", "group", "std", "batch", "none"))
    dynamic_sampling: str = option("", help="on/off: keep only groups whose rewards differ, sampling more prompts "
                                   "to fill the step (empty: the algo's)", choices=("", "on", "off"))
    max_sampling_rounds: int = option(3, help="rollout rounds per step with dynamic sampling", min=1)
    ref_refresh: int = option(0, help="copy the policy into the reference every N steps (0: never)", min=0)
    kl_every: int = option(1, help="with β = 0, log the KL to the initial policy every N steps (one no-grad "
                           "forward, ~15% of a `small` step; 0: never)", min=0)
    tis_cap: float = option(0.0, help="truncated importance sampling cap C (0: off; e.g. 2)", min=0)
    routing_replay: bool = option(False, help="reuse the rollout's MoE experts in the update")
    rollout_dtype: str = option("same", help="precision of the engine's copy of the weights (same: --precision)",
                                choices=("same", "fp32", "bf16"))
    w_accuracy: float = option(1.0, help="reward weight of accuracy", min=0)
    w_format: float = option(0.0, help="reward weight of the <think>/<answer> format (accuracy already needs the "
                             "format)", min=0)
    partial_credit: float = option(0.0, help="TinyZero-style credit for a wrong but given answer", min=0)
    eval_every: int = option(10, help="held-out pass@1 every N steps (0: never)", min=0)
    eval_n: int = option(64, help="held-out problems per evaluation", min=1)
    eval_k: int = option(1, help="samples per held-out problem", min=1)
    eval_temperature: float = option(0.0, help="held-out sampling temperature (0: greedy)", min=0)
    save_every: int = option(50, help="checkpoint every N steps (and at the end)", min=1)
    seed: int = option(0, help="seed for problems and sampling", min=0)
    max_seconds: float = option(0.0, help="stop after this wall time (0: run all --steps)", min=0)
    max_flops: float = option(0.0, help="stop once the run's FLOPs (rollouts + updates + the reference when β > 0, "
                              "stats.forward_flops_per_token) reach this (0: no limit)", min=0)
    resume: bool = option(False, help="continue the run in --out from its latest checkpoint, exactly (a larger "
                          "--steps, --max-seconds or --max-flops extends it; Ctrl-C saves a checkpoint first)")
    force: bool = option(False, help="replace an earlier grpo run in --out instead of refusing")

    def __post_init__(self):
        check(self)
        if self.resume and self.force:
            raise ValueError("--resume continues the run in --out and --force replaces it: give one of them")
        if not self.resume and not (self.init and self.task):
            raise ValueError("--init and --task are required (or --resume, to continue the run in --out)")

    @classmethod
    def from_cli(cls, given: dict) -> "GRPOConfig":
        """The flags given on the command line; with --resume, the stored run's settings plus those flags."""
        return cls.resume_of(**given) if given.get("resume") else cls(**given)

    @classmethod
    def resume_of(cls, out: str, **changes) -> "GRPOConfig":
        """The configuration that continues the run in `out` (with `changes`, e.g. steps=100 to extend it)."""
        return resume.resumed_config(cls, "grpo", {**changes, "out": str(out)}, extendable=EXTENDABLE)


EXTENDABLE = ("steps", "max_seconds", "max_flops")  # the warm-up ignores the run's length: a longer run is the same run


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
        s["scale_rewards"] = {"std": "group"}.get(cfg.scale_rewards, cfg.scale_rewards)
    if cfg.dynamic_sampling:
        s["dynamic_sampling"] = {"on": True, "off": False}[cfg.dynamic_sampling]
    if s["loss_norm"] not in ("sequence", "token", "constant"):
        raise ValueError(f"--loss-norm must be sequence, token or constant, got {s['loss_norm']!r}")
    if s["scale_rewards"] not in ("group", "batch", "none"):
        raise ValueError(f"--scale-rewards must be group, batch or none, got {s['scale_rewards']!r}")
    return s


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of 0-based `step`: linear from lr/warmup_steps to lr, then constant (no run-length input)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def run(cfg: GRPOConfig) -> Path:
    settings = resolve_algo(cfg)
    set_threads(cfg.threads)
    out = Path(cfg.out)
    check_out_dir(out, "--out", own=own_run(out, "grpo"), resumable=cfg.resume, force=cfg.force)
    if cfg.resume:
        resume.latest(out)  # a run with nothing to resume from is refused before the model loads
    task = get_task(cfg.task, **cfg.task_args)
    model, tokenizer = load_checkpoint(cfg.init)
    if cfg.force:  # only now that the inputs are known good
        clear_run(out)
    return train(model, tokenizer, task, cfg, settings, out)


def _done(cfg: GRPOConfig, state: dict) -> bool:
    """Whether a saved run has reached a limit (after a resume that raised none, it has nothing left to do)."""
    return state["step"] >= cfg.steps or bool(cfg.max_seconds and state["seconds"] > cfg.max_seconds) or bool(
        cfg.max_flops and state["flops"] >= cfg.max_flops)


def train(model, tokenizer, task, cfg: GRPOConfig, settings: dict, out: Path) -> Path:
    """The RL loop on a loaded model (the initial policy) and any Task; returns the last checkpoint. With
    cfg.resume it continues the run in `out` from its latest checkpoint."""
    saved = resume.latest(out) if cfg.resume else None
    if saved and saved[1]["finished"] and _done(cfg, saved[1]):
        return resume.nothing_to_do(saved[0], saved[1]["step"])
    out.mkdir(parents=True, exist_ok=True)
    r = _Run(model, tokenizer, task, cfg, settings, out, saved)
    bar = StageBar(f"grpo {cfg.task}", cfg.steps, r.state["step"], cfg.max_seconds, cfg.max_flops,
                   r.state["seconds"], r.state["flops"])
    path, t_start = None, time.perf_counter() - r.state["seconds"]  # a resumed run's time limit counts all sessions
    with StopRequest() as stop:  # Ctrl-C stops at the next step boundary
        while True:
            if stop.requested:  # the last finished step is saved, then the command ends with status 130
                r.state["seconds"] = time.perf_counter() - t_start
                path = r.save(finished=False)
                bar.close()
                raise Interrupted(f"interrupted after step {r.state['step']}; saved {path} (continue with --resume)")
            step = r.state["step"]
            last = step + 1 >= cfg.steps or bool(cfg.max_seconds and time.perf_counter() - t_start > cfg.max_seconds)
            record = r.step()
            last = last or bool(cfg.max_flops and r.state["flops"] >= cfg.max_flops)
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
                record.update(r.heldout())
            r.log.write(record)
            r.state["seconds"] = time.perf_counter() - t_start
            held = {"held": f"{record['heldout_accuracy']:.2f}"} if "heldout_accuracy" in record else {}
            bar.update(step + 1, r.state["seconds"], r.state["flops"], reward=f"{record['reward']:.2f}",
                       acc=f"{record['accuracy']:.2f}", **held)
            if (step + 1) % cfg.save_every == 0 or last:
                path = r.save(finished=last)
            if last:
                break
    bar.close()
    return path


class _Run:
    """A GRPO run's moving parts: the policy, the reference (the initial policy, or the last --ref-refresh copy),
    the engine's copy, the optimizer, the problem stream, the held-out set, and the counters a checkpoint carries
    so that a resumed run continues exactly: step, sequences sampled (they number the sampling seeds), FLOPs and
    seconds (the limits), plus the random generators."""

    def __init__(self, model, tokenizer, task, cfg: GRPOConfig, settings: dict, out: Path, saved=None):
        self.model, self.tokenizer, self.task, self.cfg, self.settings, self.out = (model, tokenizer, task, cfg,
                                                                                     settings, out)
        torch.manual_seed(cfg.seed)
        model.mtp.requires_grad_(False)  # RL trains the next-token policy; the MTP drafter stays as pretrained
        self.rt = rt = resolve(cfg.device, cfg.precision, training=True)
        model.to(rt.device)
        self.forward = prepare_for_training(model, rt)  # bf16 compute copies of the fp32 masters
        rollout_rt = rt if cfg.rollout_dtype == "same" else resolve(cfg.device, cfg.rollout_dtype)
        write_run_json(out, "grpo", {**dataclasses.asdict(cfg), "effective": settings, "runtime": rt.describe(),
                                     "rollout_runtime": rollout_rt.describe()})
        self.reference = prepare_inference(copy.deepcopy(model), rt).eval().requires_grad_(False)  # initial policy
        self.optimizer = build_optimizer(model, cfg.lr, weight_decay=0.0)
        self.log, self.stream = MetricsLog(out / "metrics.jsonl"), task.stream(cfg.seed, "train")
        self.state = {"step": 0, "sequences": 0, "flops": 0.0, "seconds": 0.0}
        if saved is not None:
            self._restore(*saved)
        # the engine's copy is made after a restore: it holds the weights being trained
        self.rollout_model = model if rollout_rt.precision == "fp32" else prepare_inference(copy.deepcopy(model),
                                                                                             rollout_rt)
        self.engine = Engine(self.rollout_model, tokenizer)
        print(f"grpo: {rt.precision} update on {rt.device}, {rollout_rt.precision} rollouts", file=sys.stderr)
        self.problems = task.problems(cfg.seed, cfg.eval_n, split="heldout") if cfg.eval_every else []
        (out / "heldout.jsonl").write_text("".join(json.dumps({"id": p.id, "question": p.question,
                                                               "answer": p.answer}) + "\n" for p in self.problems))
        if cfg.eval_every and not self.state["step"]:  # the starting point, before any update
            self.log.write({"step": 0, **self.heldout()})

    def heldout(self) -> dict:
        return _heldout(self.engine, self.task, self.problems, self.cfg)

    def step(self) -> dict:
        """One step: rollouts, the update, the engine's copy refreshed; returns its metrics record."""
        cfg, settings, state = self.cfg, self.settings, self.state
        step = state["step"]
        lr = warmup_lr(step, cfg.lr, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        repeats = self.stream.repeats
        batch, record = collect(self.engine, self.task, self.stream, cfg, settings, state["sequences"])
        state["sequences"] += record.pop("sequences")
        if batch is not None:
            kl_now = settings["beta"] > 0 or (cfg.kl_every and step % cfg.kl_every == 0)
            record.update(update(self.model, self.reference if kl_now else None, self.optimizer, batch, cfg, settings,
                                 self.forward))
        if self.rollout_model is not self.model:  # the engine samples from the weights just trained
            self.rollout_model.load_state_dict(self.model.state_dict())
        state["flops"] += step_flops(self.model.cfg, record, settings["beta"], cfg.mu,
                                     record.get("optimizer_steps", 1) > cfg.mu)
        state["step"] = step + 1
        record.update(step=step + 1, lr=lr, temperature=cfg.temperature, problems_seen=len(self.stream.seen),
                      problems_repeated=self.stream.repeats - repeats, flops_total=state["flops"])
        if cfg.ref_refresh and (step + 1) % cfg.ref_refresh == 0:
            self.reference.load_state_dict(self.model.state_dict())
        return record

    def save(self, finished: bool) -> Path:
        state = {**self.state, "finished": finished, "optimizer": self.optimizer.state_dict(),
                 "stream": resume.stream_state(self.stream), "rng": resume.rng_state(),
                 # a refreshed reference is not the initial policy a resume reloads from --init
                 "reference": self.reference.state_dict() if self.cfg.ref_refresh else None}
        meta = {"stage": "grpo", "init": str(self.cfg.init), **self.rt.checkpoint_meta()}
        return resume.save(self.out, self.state["step"], self.model, self.tokenizer, meta, state)

    def _restore(self, path: Path, saved: dict) -> None:
        resume.check_precision(path, self.rt.precision)
        resume.load_weights(path, self.model)
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved["reference"] is not None:
            self.reference.load_state_dict(saved["reference"])
        resume.load_stream_state(self.stream, saved["stream"])
        resume.set_rng_state(saved["rng"])
        self.state = {k: saved[k] for k in self.state}
        self.log.truncate_after(self.state["step"])  # a killed run may have logged steps past its checkpoint
        print(f"resumed from {path} (step {self.state['step']})", file=sys.stderr)


def step_flops(cfg, record: dict, beta: float, mu: int, minibatches: bool = False) -> float:
    """FLOPs of one step, from the token counts it logged: every sampled token once (rollouts), every trained
    token 3× per pass (forward + backward), once more for the reference when β > 0 (the KL is in the loss) and
    once for the old policy when μ > 1 or the batch is split into minibatches. A KL logged only as a diagnostic
    (β = 0) is not counted."""
    sampled, trained = record.get("rollout_tokens", 0), record.get("update_tokens", 0)
    fwd = forward_flops_per_token(cfg, record.get("rollout_tokens", 0) / max(record.get("sequences_sampled", 1), 1))
    return fwd * (sampled + trained * (3 * mu + (beta > 0) + (mu > 1 or minibatches)))


def _heldout(engine: Engine, task, problems, cfg: GRPOConfig) -> dict:
    r = evaluate(engine, task, problems, k=cfg.eval_k, temperature=cfg.eval_temperature,
                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    return {"heldout_accuracy": r["accuracy"], "heldout_format": r["format"], "heldout_cons": r["cons_at_k"]}


# ----------------------------------------------------------------------------- rollouts


def collect(engine: Engine, task, stream, cfg: GRPOConfig, settings: dict, first_seq: int):
    """One step's training batch from fresh problems. With dynamic sampling (DAPO §3.3), groups whose rewards
    are all equal are dropped and new problems sampled, up to --max-sampling-rounds rounds, until the step has
    --prompts-per-step informative groups. Returns (batch or None if no group is left, rollout metrics over
    everything sampled)."""
    rounds = cfg.max_sampling_rounds if settings["dynamic_sampling"] else 1
    sampled, kept = [], []
    for _ in range(rounds):
        problems = stream.take(cfg.prompts_per_step)
        batch, _ = rollout(engine, task, problems, cfg, first_seq + sum(len(b["completions"]) for b in sampled))
        sampled.append(batch)
        informative = (batch["rewards"].std(dim=1) > 0).tolist() if settings["dynamic_sampling"] else None
        kept.append(_select_groups(batch, informative) if informative is not None else batch)
        if sum(b["rewards"].shape[0] for b in kept) >= cfg.prompts_per_step:
            break
    everything = _concat(sampled)
    record = rollout_metrics(everything, cfg)
    record["sequences"] = record["sequences_sampled"] = len(everything["completions"])
    record["rollout_tokens"] = sum(len(p) + len(c) for p, c in zip(everything["prompts"], everything["completions"]))
    train = _concat(kept)
    n_groups = train["rewards"].shape[0]
    if n_groups > cfg.prompts_per_step:
        train = _select_groups(train, [g < cfg.prompts_per_step for g in range(n_groups)])
    record.update(sampling_rounds=len(sampled), kept_groups=train["rewards"].shape[0] / cfg.prompts_per_step)
    return (train if train["rewards"].shape[0] else None), record


def rollout(engine: Engine, task, problems, cfg: GRPOConfig, first_seq: int):
    """G samples per prompt (sequence i seeded with sequence_seed(seed, first_seq + i)); returns the batch and
    its metrics. The batch keeps the engine's log-probs and, for MoE models, the experts it chose."""
    prompts = [task.prompt(p) for p in problems for _ in range(cfg.group_size)]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop=list(STOP))
    t0 = time.perf_counter()
    seeds = [sequence_seed(cfg.seed, first_seq + i) for i in range(len(prompts))]
    with RoutingCapture(engine.model) as capture:
        gens = engine.generate(prompts, params, seeds=seeds, decode_rows=capture.decode_rows)
    rollout_s = time.perf_counter() - t0
    scores = [task.score(problems[i // cfg.group_size], g.text) for i, g in enumerate(gens)]
    rewards = torch.tensor([combine(s, cfg.w_accuracy, cfg.w_format, cfg.partial_credit) for s in scores])
    prompt_ids, completions = [g.prompt_tokens for g in gens], [g.tokens for g in gens]
    batch = {"prompts": prompt_ids, "completions": completions, "logprobs": [g.logprobs for g in gens],
             "rewards": rewards.view(len(problems), cfg.group_size),
             "scores": [{k: s[k] for k in ("accuracy", "format", "partial")} for s in scores],
             "truncated": [g.finish_reason == "length" for g in gens], "problem_ids": [p.id for p in problems],
             "routes": capture.per_row(prompt_ids, completions), "pad": engine.tokenizer.pad_id,
             "rollout_s": rollout_s}
    return batch, rollout_metrics(batch, cfg)


def _select_groups(batch: dict, keep: list[bool]) -> dict:
    """The batch restricted to the groups (rows of batch["rewards"]) where keep is True."""
    G = batch["rewards"].shape[1]
    seqs = [i for i in range(len(batch["completions"])) if keep[i // G]]
    out = {k: [v[i] for i in seqs] for k, v in batch.items() if k in _PER_SEQUENCE and v is not None}
    out.update(rewards=batch["rewards"][torch.tensor(keep, dtype=torch.bool)], pad=batch["pad"],
               rollout_s=batch["rollout_s"], routes=[batch["routes"][i] for i in seqs] if batch["routes"] else None,
               problem_ids=[p for p, k in zip(batch["problem_ids"], keep) if k])
    return out


_PER_SEQUENCE = ("prompts", "completions", "logprobs", "scores", "truncated")


def _concat(batches: list[dict]) -> dict:
    out = {k: [x for b in batches for x in b[k]] for k in _PER_SEQUENCE + ("problem_ids",)}
    routes = [b["routes"] for b in batches]
    out.update(rewards=torch.cat([b["rewards"] for b in batches]), pad=batches[0]["pad"],
               rollout_s=sum(b["rollout_s"] for b in batches),
               routes=None if any(r is None for r in routes) else [x for r in routes for x in r])
    return out


def rollout_metrics(batch: dict, cfg: GRPOConfig) -> dict:
    """Reward components, lengths and group statistics of a batch (every sampled sequence)."""
    scores, rewards, n = batch["scores"], batch["rewards"], len(batch["scores"])
    mean = lambda key: sum(s[key] for s in scores) / n  # noqa: E731
    lengths = [len(c) for c in batch["completions"]]
    right = [ln for ln, s in zip(lengths, scores) if s["accuracy"] == 1.0]
    wrong = [ln for ln, s in zip(lengths, scores) if s["accuracy"] != 1.0]
    accuracy = torch.tensor([s["accuracy"] for s in scores]).view_as(rewards)
    differ = rewards.std(dim=1) > 0
    record = {
        "reward": rewards.mean().item(), "accuracy": mean("accuracy"), "format": mean("format"),
        "reward_accuracy": cfg.w_accuracy * mean("accuracy"), "reward_format": cfg.w_format * mean("format"),
        "reward_partial": cfg.partial_credit * sum(s["partial"] * (s["accuracy"] == 0) for s in scores) / n,
        "frac_zero_std": (~differ).float().mean().item(),
        # groups whose rewards differ although their accuracies do not: advantages made by format or partial credit
        "frac_format_only": (differ & (accuracy.std(dim=1) == 0)).float().mean().item(),
        "response_len": sum(lengths) / n, "response_len_max": max(lengths),
        "response_len_correct": sum(right) / len(right) if right else None,
        "response_len_wrong": sum(wrong) / len(wrong) if wrong else None,
        "truncated": sum(batch["truncated"]) / n, "rollout_s": batch["rollout_s"],
        "rollout_tokens_per_s": sum(lengths) / max(batch["rollout_s"], 1e-9), "problems": batch["problem_ids"],
    }
    return {k: v for k, v in record.items() if v is not None}  # a length with no sequence to average is left out


# ----------------------------------------------------------------------------- MoE routing: capture and replay


def _gates(model) -> list:
    return [layer.ffn.gate for layer in model.layers if isinstance(layer.ffn, MoE)]


class RoutingCapture:
    """The experts every main-layer MoE gate chose while the engine decoded, rebuilt per sequence.

    Forward hooks record each gate call: the prefill (every prompt position; a prompt repeated in a group is
    prefilled once, in torch.unique order, as the engine does) and then one call per decode step over the rows
    still running, whose prompt indices the engine reports in `decode_rows`. `per_row` returns, per sequence,
    (n_moe_layers, len(prompt) + len(completion) - 1, K) expert ids: the routing of every input position of the
    update, or None when the calls do not have that shape (an engine whose call pattern differs: the diagnostic
    is then skipped rather than wrong)."""

    def __init__(self, model):
        self.gates = _gates(model)
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.gates]
        self.decode_rows: list[list[int]] = []
        self.handles = []

    def __enter__(self):
        for i, gate in enumerate(self.gates):
            self.handles.append(gate.register_forward_hook(lambda m, a, out, i=i: self.calls[i].append(out[1])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def per_row(self, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor] | None:
        if not self.gates:
            return None
        B, L = len(prompts), max(len(p) for p in prompts)
        padded = torch.zeros(B, L, dtype=torch.long)
        for b, p in enumerate(prompts):
            padded[b, :len(p)] = torch.tensor(p)
        unique, inverse = torch.unique(padded, dim=0, return_inverse=True)
        U = unique.shape[0]
        rows = torch.arange(B) if U == B else inverse
        steps = self.decode_rows
        out = [[] for _ in range(B)]  # per sequence, per layer: (T_b, K)
        for calls in self.calls:
            if len(calls) != len(steps) + 1 or calls[0].shape[0] != U * L or any(
                    c.shape[0] != len(r) for c, r in zip(calls[1:], steps)):
                return None
            K = calls[0].shape[1]
            prefill = calls[0].view(U, L, K)[rows]  # (B, L, K)
            decoded = [[] for _ in range(B)]
            for c, r in zip(calls[1:], steps):
                for j, b in enumerate(r):
                    decoded[b].append(c[j])
            for b, (p, comp) in enumerate(zip(prompts, completions)):
                dec = torch.stack(decoded[b][:len(comp) - 1]) if len(comp) > 1 else prefill.new_zeros(0, K)
                if dec.shape[0] != len(comp) - 1:
                    return None
                out[b].append(torch.cat([prefill[b, :len(p)], dec]))
        return [torch.stack(layers) for layers in out]


class RoutingHooks:
    """During the update's forward: compare each gate's own experts with the rollout's (positions where
    `routes` >= 0), and with replay=True use the rollout's experts instead, recomputing their combine weights
    from the gate's differentiable scores (so the router still learns)."""

    def __init__(self, model, routes: torch.Tensor, replay: bool):
        self.gates, self.routes, self.replay = _gates(model), routes, replay  # routes (B, n_moe, T, K)
        self.mismatch: list[torch.Tensor] = []  # per gate (B, T): the expert sets differ
        self.handles = []

    def __enter__(self):
        for i, gate in enumerate(self.gates):
            self.handles.append(gate.register_forward_hook(lambda m, a, out, i=i: self._hook(m, out, i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, gate, out, i):
        weights, own, scores = out
        B, _, T, K = self.routes.shape
        target = self.routes[:, i].reshape(B * T, K)
        valid = target[:, 0] >= 0
        differ = (own.sort(dim=1)[0] != target.sort(dim=1)[0]).any(dim=1) & valid
        self.mismatch.append(differ.view(B, T))
        if not self.replay:
            return None
        idx = torch.where(valid[:, None], target, own)
        w = scores.gather(1, idx)
        if gate.normalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return (w * gate.route_scale).to(weights.dtype), idx, scores


# ----------------------------------------------------------------------------- the update


def _pack_routes(routes: list[torch.Tensor], T: int) -> torch.Tensor:
    """Per-sequence (n_moe, T_i, K) expert ids → (B, n_moe, T, K), -1 past each sequence's end."""
    n, _, K = routes[0].shape
    out = torch.full((len(routes), n, T, K), -1, dtype=torch.long)
    for i, r in enumerate(routes):
        out[i, :, : r.shape[1]] = r
    return out


def _forward(model, forward, inputs, targets, mask, temperature, routes, replay: bool):
    """completion_logprobs through `forward`, with the rollout's routing compared (and replayed if asked) on
    `model`'s gates when routes are given; returns (logp, entropy, mismatch (n_moe, B, T) bool or None)."""
    if routes is None:
        return (*completion_logprobs(forward, inputs, targets, mask, temperature), None)
    with RoutingHooks(model, routes, replay) as hooks:
        logp, ent = completion_logprobs(forward, inputs, targets, mask, temperature)
    return logp, ent, torch.stack(hooks.mismatch)


def update(model, reference, optimizer, batch: dict, cfg: GRPOConfig, settings: dict, forward=None) -> dict:
    """μ passes over one rollout batch, each split into --minibatches optimiser steps, through `forward` (default:
    the model; or its mixed-precision view); returns the loss and the update's diagnostics.

    With one minibatch and μ = 1 the update is on-policy and the ratio π_θ/π_old is 1, so the clip never acts. With
    several minibatches (R1: 16 per rollout batch, one pass), every step after the first trains on samples of a
    policy one or more steps old, the ratio moves off 1 and the clipped objective bounds how far each step can push
    a sampled token's probability: a trust region, and more optimiser steps per (expensive) rollout."""
    forward = forward or model
    adv = group_advantages(batch["rewards"], settings["scale_rewards"]).flatten()
    G = batch["rewards"].shape[1]
    informative = batch["rewards"].std(dim=1) > 0
    rows = [i for i in range(len(batch["completions"])) if informative[i // G] or not settings["dynamic_sampling"]]
    if not rows:
        return {"loss": 0.0}
    inputs, targets, mask = pack_completions([batch["prompts"][i] for i in rows],
                                             [batch["completions"][i] for i in rows], batch["pad"])
    rollout_lp = torch.zeros(mask.shape).masked_scatter(mask, torch.tensor(
        [x for i in rows for x in batch["logprobs"][i]], dtype=torch.float32)) if batch.get("logprobs") else None
    routes = _pack_routes([batch["routes"][i] for i in rows], inputs.shape[1]) if batch.get("routes") else None
    advantages, T = adv[rows], cfg.temperature
    minibatches = _minibatches(len(rows), G, cfg.minibatches, cfg.micro_batch)
    chunks = [sl for mb in minibatches for sl in mb]
    route = lambda sl: routes[sl] if routes is not None else None  # noqa: E731
    model.train()
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_logp = torch.cat([completion_logprobs(reference, inputs[sl], targets[sl], mask[sl], T)[0]
                              for sl in chunks]) if reference is not None else None
        reference_s = time.perf_counter() - t0
        old = [_forward(model, forward, inputs[sl], targets[sl], mask[sl], T, route(sl), cfg.routing_replay)
               for sl in chunks] if cfg.mu > 1 or len(minibatches) > 1 else None
    stats = {"loss": 0.0, "clip_frac": 0.0, "clip_low": 0.0, "clip_high": 0.0, "grad_norm": 0.0,
             "ratio_max": 1.0, "ratio_min": 1.0}
    first: list[tuple] = [o for o in old] if old is not None else []
    n_steps = cfg.mu * len(minibatches)
    for _ in range(cfg.mu):
        c = 0
        for mb in minibatches:
            optimizer.zero_grad(set_to_none=True)
            n_tok, n_seq = sum(mask[sl].sum() for sl in mb).clamp(min=1), sum(sl.stop - sl.start for sl in mb)
            for sl in mb:
                logp, ent, mism = _forward(model, forward, inputs[sl], targets[sl], mask[sl], T, route(sl),
                                           cfg.routing_replay)
                if old is None:
                    first.append((logp.detach(), ent.detach(), mism))
                old_lp = first[c][0]
                c += 1
                is_w = (old_lp - rollout_lp[sl]).exp().clamp(max=cfg.tis_cap) if cfg.tis_cap and \
                    rollout_lp is not None else None
                ref = ref_logp[sl] if ref_logp is not None else None
                loss, s = grpo_loss(logp, old_lp, advantages[sl], mask[sl], cfg.eps_low, settings["eps_high"],
                                    settings["beta"], ref, settings["loss_norm"], cfg.max_new_tokens, is_weight=is_w)
                share = mask[sl].sum() / n_tok if settings["loss_norm"] == "token" else logp.shape[0] / n_seq
                (loss * share).backward()
                stats["loss"] += loss.item() * float(share) / n_steps
                tok_share = float(mask[sl].sum() / n_tok) / n_steps
                for key in ("clip_frac", "clip_low", "clip_high"):
                    stats[key] += s[key] * tok_share
                stats["ratio_max"] = max(stats["ratio_max"], s["ratio_max"])
                stats["ratio_min"] = min(stats["ratio_min"], s["ratio_min"])
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip).item()
            if math.isfinite(grad_norm):
                optimizer.step()
            stats["grad_norm"] += grad_norm / n_steps
    model.eval()
    stats.update(_diagnostics(first, mask, rollout_lp, ref_logp, cfg.tis_cap))
    stats.update(update_s=time.perf_counter() - t0, reference_s=reference_s,  # what logging KL costs
                 update_tokens=int((inputs != batch["pad"]).sum()), optimizer_steps=n_steps)
    return stats


def _minibatches(n_rows: int, group_size: int, n: int, micro: int) -> list[list[slice]]:
    """Rows split into at most n minibatches of whole groups (a group's advantages are relative to each other),
    each a list of micro-batch slices of at most `micro` rows."""
    groups = n_rows // group_size if n_rows % group_size == 0 else 1  # rows that are not whole groups stay together
    per = -(-groups // min(n, groups)) * (n_rows // groups)
    return [[slice(i, min(i + micro, start + per, n_rows)) for i in range(start, min(start + per, n_rows), micro)]
            for start in range(0, n_rows, per)]


def _diagnostics(first: list[tuple], mask, rollout_lp, ref_logp, tis_cap: float) -> dict:
    """Token means over the completion tokens, at the pre-update policy: entropy, KL to the initial policy,
    the rollout-vs-update log-prob gap and importance ratio, and the routing mismatch."""
    logp, ent = torch.cat([f[0] for f in first]), torch.cat([f[1] for f in first])
    on = mask
    out = {"entropy": ent[on].mean().item()}
    if rollout_lp is not None:
        gap = (logp - rollout_lp)[on].double()  # update minus rollout on the same tokens (float64 statistics)
        w = gap.exp()
        out.update(logp_gap_mean=gap.mean().item(), logp_gap_abs_mean=gap.abs().mean().item(),
                   logp_gap_abs_max=gap.abs().max().item(),
                   kl_rollout=(w - gap - 1).mean().item(),  # k3 estimate of KL(π_rollout || π_update)
                   is_ratio_mean=w.mean().item(), is_ratio_min=w.min().item(), is_ratio_max=w.max().item(),
                   is_ratio_out_frac=((w < 0.5) | (w > 2)).double().mean().item())
        if tis_cap:
            out["is_ratio_capped_frac"] = (w > tis_cap).double().mean().item()
    if ref_logp is not None:
        out["kl"] = k3_kl(logp, ref_logp)[on].mean().item()
    if all(f[2] is not None for f in first):
        mism = torch.cat([f[2] for f in first], dim=1)  # (n_moe, B, T)
        out["routing_mismatch"] = mism[:, on].float().mean().item()  # (token, layer) pairs whose experts differ
        out["routing_mismatch_tokens"] = mism.any(dim=0)[on].float().mean().item()  # tokens, any layer
    return out
