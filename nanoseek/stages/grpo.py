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
  importance ratios, and the MoE routing mismatch between rollout and update (routing.py). --routing-replay
  reuses the rollout's experts in the update (Rollout Routing Replay, arXiv 2510.11370); --tis-cap C weights
  tokens by min(π_update / π_rollout, C) (truncated importance sampling). OUT/samples.jsonl keeps a few
  rollouts per step (question, completion, reward).
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

from ..checkpoint import load, recorded_precision
from ..engine import Engine, SamplingParams, sequence_seed
from ..errors import Interrupted
from ..evaluation import evaluate
from ..losses import grpo_loss, group_advantages, k3_kl, process_advantages
from ..metrics import TENSORBOARD_HELP, check_tensorboard
from ..optim import build_optimizer
from ..rollouts import RolloutBatch, completion_logprobs, pack_completions, steps_of_tokens
from ..routing import RoutingCapture, completion_logprobs_routed, pack_routes
from ..stats import forward_flops_per_token
from ..options import ComputeOptions, check, check_out_dir, option, own_run
from ..runtime import prepare_for_training, prepare_inference, resolve, set_threads
from ..tasks import TASKS, get_task
from ..tasks.base import Task, combine
from ..template import STOP
from . import resume
from .common import MetricsLog, StopRequest, clear_run, write_run_json
from .progress import StageBar

ALGOS = {  # the settings each named recipe fixes
    "grpo": dict(scale_rewards="group", loss_norm="sequence", eps_high=0.2, beta=0.04, dynamic_sampling=False),
    "dr-grpo": dict(scale_rewards="none", loss_norm="constant", eps_high=0.2, beta=0.0, dynamic_sampling=False),
    "dapo": dict(scale_rewards="group", loss_norm="token", eps_high=0.28, beta=0.0, dynamic_sampling=True),
}


@dataclass(frozen=True)
class GRPOSettings:
    """What the loss and the sampling use, resolved once (`resolve_algo`): the named algorithm's values, each
    overridden by its flag when given. The loop reads these from here only, never from the flags (where -1 and ""
    mean "the algorithm's")."""

    scale_rewards: str  # advantage std: "group", "batch" or "none" (losses.group_advantages)
    loss_norm: str  # "sequence", "token" or "constant" (losses.grpo_loss)
    eps_low: float  # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float
    beta: float  # k3 KL coefficient in the loss
    dynamic_sampling: bool  # keep only groups whose rewards differ (DAPO)


@dataclass(kw_only=True)
class GRPOConfig(ComputeOptions, resume.Resumable):
    """R1-Zero-style RL with rule-based rewards (GRPO, Dr. GRPO, DAPO) from a checkpoint on a verifiable task.
    Writes OUT/metrics.jsonl (per step: lr, rewards, diagnostics, held-out pass@1), OUT/heldout.jsonl and
    OUT/checkpoints/step_N/."""

    command = "grpo"
    required = ("init", "task")
    # limits a --resume may raise: the warm-up ignores the run's length, so a longer run is the same run
    extendable = ("steps", "max_seconds", "max_flops")

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
    process_reward: str = option("off", help="per-step rewards from the task's line checker (process supervision, "
                                 "DeepSeekMath §4.1.3): to-go = a token's advantage sums the normalised rewards of "
                                 "its step and every later one (the paper's), step = its own step's only; off: the "
                                 "outcome reward alone", choices=("off", "to-go", "step"))
    log_samples: int = option(2, help="rollouts per step written to OUT/samples.jsonl (question, completion, "
                              "reward), to read what the policy does", min=0)
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
    tensorboard: str = option("", help=TENSORBOARD_HELP, metavar="DIR")

    def __post_init__(self):
        check(self)
        check_tensorboard(self.tensorboard)
        self.check_resume()


def resolve_algo(cfg: GRPOConfig) -> GRPOSettings:
    """The effective settings: explicit flags override the named algorithm's."""
    if cfg.algo not in ALGOS:
        raise ValueError(f"--algo must be one of {', '.join(ALGOS)}, got {cfg.algo!r}")
    s = dict(ALGOS[cfg.algo], eps_low=cfg.eps_low)
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
    return GRPOSettings(**s)


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of 0-based `step`: linear from lr/warmup_steps to lr, then constant (no run-length input)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def run(cfg: GRPOConfig) -> Path:
    resolve_algo(cfg)  # a bad combination of flags is refused before anything loads
    set_threads(cfg.threads)
    out = Path(cfg.out)
    check_out_dir(out, "--out", own=own_run(out, "grpo"), resumable=cfg.resume, force=cfg.force)
    if cfg.resume:
        resume.latest(out)  # a run with nothing to resume from is refused before the model loads
    task = get_task(cfg.task, **cfg.task_args)
    if cfg.process_reward != "off" and type(task).step_rewards is Task.step_rewards:
        raise ValueError(f"--process-reward {cfg.process_reward}: task {cfg.task} judges outcomes only (it has no "
                         "step_rewards); use --process-reward off")
    model, tokenizer = load(cfg.init, require_tokenizer=True)
    cfg = fit_to_context(cfg, task, tokenizer, model.cfg.max_seq_len)
    if cfg.force:  # only now that the inputs are known good
        clear_run(out)
    return train(model, tokenizer, task, cfg, out)


def fit_to_context(cfg: GRPOConfig, task, tokenizer, context: int, margin: int = 8) -> GRPOConfig:
    """cfg with --max-new-tokens capped so that the task's prompts and their responses fit the model's context,
    saying so on stderr: the defaults then compose (`tiny`'s 256 positions hold a countdown prompt of ~200 tokens
    but not 96 more). The longest prompt is measured over 512 training problems and the held-out set; the cap
    keeps `margin` tokens for a longer prompt that the sample missed. ValueError when too little room is left."""
    problems = task.stream(cfg.seed, "train").take(512)  # a small space repeats: only lengths are wanted here
    problems += task.stream(cfg.seed, "heldout").take(cfg.eval_n) if cfg.eval_every else []
    longest = max(len(tokenizer.encode(task.prompt(p))) for p in problems)
    if longest + cfg.max_new_tokens <= context:
        return cfg
    room = context - longest - margin
    if room < 16:
        raise ValueError(f"--task {cfg.task}: its prompts take up to {longest} tokens of the model's context of "
                         f"{context}, leaving no room for a response; use a model with a longer max_seq_len")
    print(f"grpo: --task {cfg.task}'s prompts take up to {longest} tokens: --max-new-tokens {cfg.max_new_tokens} "
          f"capped to {room} to fit the model's context of {context}", file=sys.stderr)
    return dataclasses.replace(cfg, max_new_tokens=room)


def _done(cfg: GRPOConfig, state: dict) -> bool:
    """Whether a saved run has reached a limit (after a resume that raised none, it has nothing left to do)."""
    return state["step"] >= cfg.steps or bool(cfg.max_seconds and state["seconds"] > cfg.max_seconds) or bool(
        cfg.max_flops and state["flops"] >= cfg.max_flops)


def train(model, tokenizer, task, cfg: GRPOConfig, out: Path) -> Path:
    """The RL loop on a loaded model (the initial policy) and any Task; returns the last checkpoint. With
    cfg.resume it continues the run in `out` from its latest checkpoint."""
    saved = resume.latest(out) if cfg.resume else None
    if saved and saved[1]["finished"] and _done(cfg, saved[1]):
        return resume.nothing_to_do(saved[0], saved[1]["step"])
    out.mkdir(parents=True, exist_ok=True)
    r = _Run(model, tokenizer, task, cfg, out, saved)
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

    def __init__(self, model, tokenizer, task, cfg: GRPOConfig, out: Path, saved=None):
        self.model, self.tokenizer, self.task, self.cfg, self.out = model, tokenizer, task, cfg, out
        self.settings = settings = resolve_algo(cfg)
        torch.manual_seed(cfg.seed)
        model.mtp.requires_grad_(False)  # RL trains the next-token policy; the MTP drafter stays as pretrained
        self.rt = rt = resolve(cfg.device, cfg.precision, training=True, recorded=recorded_precision(cfg.init))
        model.to(rt.device)
        self.forward = prepare_for_training(model, rt)  # bf16 compute copies of the fp32 masters
        rollout_rt = rt if cfg.rollout_dtype == "same" else resolve(cfg.device, cfg.rollout_dtype)
        write_run_json(out, "grpo", {**dataclasses.asdict(cfg), "effective": dataclasses.asdict(settings),
                                     "runtime": rt.describe(),
                                     "rollout_runtime": rollout_rt.describe()})
        self.reference = prepare_inference(copy.deepcopy(model), rt).eval().requires_grad_(False)  # initial policy
        self.optimizer = build_optimizer(model, cfg.lr, weight_decay=0.0)
        self.log, self.stream = MetricsLog(out / "metrics.jsonl", cfg.tensorboard), task.stream(cfg.seed, "train")
        self.samples = MetricsLog(out / "samples.jsonl")
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
        batch, record = collect_rollouts(self.engine, self.task, self.stream, cfg, settings, state["sequences"])
        state["sequences"] += record.pop("sequences")
        for sample in record.pop("samples"):
            self.samples.write({"step": step + 1, **sample})
        if batch is not None:
            kl_now = settings.beta > 0 or (cfg.kl_every and step % cfg.kl_every == 0)
            record.update(update(self.model, self.reference if kl_now else None, self.optimizer, batch, cfg, settings,
                                 self.forward))
        if self.rollout_model is not self.model:  # the engine samples from the weights just trained
            self.rollout_model.load_state_dict(self.model.state_dict())
        state["flops"] += step_flops(self.model.cfg, record, settings.beta, cfg.mu,
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
        self.samples.truncate_after(self.state["step"])
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


def collect_rollouts(engine: Engine, task, stream, cfg: GRPOConfig, settings: GRPOSettings, first_seq: int):
    """One step's training batch from fresh problems. With dynamic sampling (DAPO §3.3), groups whose rewards
    are all equal are dropped and new problems sampled, up to --max-sampling-rounds rounds, until the step has
    --prompts-per-step informative groups. Returns (batch or None if no group is left, rollout metrics over
    everything sampled, with --log-samples of its rollouts under "samples")."""
    rounds = cfg.max_sampling_rounds if settings.dynamic_sampling else 1
    sampled, kept = [], []
    for _ in range(rounds):
        problems = stream.take(cfg.prompts_per_step)
        batch = rollout(engine, task, problems, cfg, first_seq + sum(len(b.completions) for b in sampled))
        sampled.append(batch)
        kept.append(batch.select((batch.rewards.std(dim=1) > 0).tolist()) if settings.dynamic_sampling else batch)
        if sum(b.rewards.shape[0] for b in kept) >= cfg.prompts_per_step:
            break
    everything = RolloutBatch.concat(sampled)
    record = rollout_metrics(everything, cfg)
    record["sequences"] = record["sequences_sampled"] = len(everything.completions)
    record["rollout_tokens"] = sum(len(p) + len(c) for p, c in zip(everything.prompts, everything.completions))
    record["samples"] = _samples(everything, cfg.log_samples)
    train = RolloutBatch.concat(kept)
    n_groups = train.rewards.shape[0]
    if n_groups > cfg.prompts_per_step:
        train = train.select([g < cfg.prompts_per_step for g in range(n_groups)])
    record.update(sampling_rounds=len(sampled), kept_groups=train.rewards.shape[0] / cfg.prompts_per_step)
    return (train if train.rewards.shape[0] else None), record


def rollout(engine: Engine, task, problems, cfg: GRPOConfig, first_seq: int) -> RolloutBatch:
    """G samples per prompt (sequence i seeded with sequence_seed(seed, first_seq + i)), scored by the task. The
    batch keeps the engine's log-probs and, for MoE models, the experts it chose."""
    prompts = [task.prompt(p) for p in problems for _ in range(cfg.group_size)]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop=list(STOP))
    t0 = time.perf_counter()
    seeds = [sequence_seed(cfg.seed, first_seq + i) for i in range(len(prompts))]
    with RoutingCapture(engine.model) as capture:
        gens = engine.generate(prompts, params, seeds=seeds)
    rollout_s = time.perf_counter() - t0
    scores = [task.score(problems[i // cfg.group_size], g.text) for i, g in enumerate(gens)]
    rewards = torch.tensor([combine(s, cfg.w_accuracy, cfg.w_format, cfg.partial_credit) for s in scores])
    prompt_ids, completions = [g.prompt_tokens for g in gens], [g.tokens for g in gens]
    step_rewards, token_steps = _process_rewards(engine.tokenizer, task, problems, gens, cfg)
    routes = capture.per_row(prompt_ids, completions, gens.stats.decode_rows) if capture.gates else None
    return RolloutBatch(prompts=prompt_ids, completions=completions,
                        rewards=rewards.view(len(problems), cfg.group_size), pad=engine.tokenizer.pad_id, logprobs=[g.logprobs for g in gens], texts=[g.text for g in gens],
                        scores=[{k: s[k] for k in ("accuracy", "format", "partial")} for s in scores],
                        truncated=[g.finish_reason == "length" for g in gens], routes=routes,
                        problem_ids=[p.id for p in problems], questions=[p.question for p in problems],
                        rollout_s=rollout_s, step_rewards=step_rewards, token_steps=token_steps)


def _process_rewards(tokenizer, task, problems, gens, cfg: GRPOConfig) -> tuple[list, list]:
    """With --process-reward: each completion's step rewards and the step of each of its tokens; else ([], [])."""
    if cfg.process_reward == "off":
        return [], []
    steps = [task.step_rewards(problems[i // cfg.group_size], g.text) or [(0, 0.0)] for i, g in enumerate(gens)]
    decode = lambda ids: tokenizer.decode([t for t in ids if t != tokenizer.eos_id])  # noqa: E731 -- as g.text
    return ([[r for _, r in st] for st in steps],
            [steps_of_tokens(decode, g.tokens, [end for end, _ in st]) for g, st in zip(gens, steps)])


def _samples(batch: RolloutBatch, n: int) -> list[dict]:
    """The first completion of each of the first n groups: what the policy writes, to read beside the metrics."""
    G = batch.group_size
    return [{"problem": batch.problem_ids[g], "question": batch.questions[g], "completion": batch.texts[g * G],
             "reward": batch.rewards[g, 0].item(), "accuracy": batch.scores[g * G]["accuracy"]}
            for g in range(min(n, batch.rewards.shape[0]))]


def rollout_metrics(batch: RolloutBatch, cfg: GRPOConfig) -> dict:
    """Reward components, lengths and group statistics of a batch (every sampled sequence)."""
    scores, rewards, n = batch.scores, batch.rewards, len(batch.scores)
    mean = lambda key: sum(s[key] for s in scores) / n  # noqa: E731
    lengths = [len(c) for c in batch.completions]
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
        "truncated": sum(batch.truncated) / n, "rollout_s": batch.rollout_s,
        # the share of steps the task's line checker finds right (process reward only)
        "step_reward": (sum(map(sum, batch.step_rewards)) / sum(map(len, batch.step_rewards))
                        if batch.step_rewards else None),
        "rollout_tokens_per_s": sum(lengths) / max(batch.rollout_s, 1e-9), "problems": batch.problem_ids,
    }
    return {k: v for k, v in record.items() if v is not None}  # a length with no sequence to average is left out


# ----------------------------------------------------------------------------- the update


def update(model, reference, optimizer, batch: RolloutBatch, cfg: GRPOConfig, settings: GRPOSettings,
           forward=None) -> dict:
    """μ passes over one rollout batch, each split into --minibatches optimiser steps, through `forward` (default:
    the model; or its mixed-precision view); returns the loss and the update's diagnostics.

    With one minibatch and μ = 1 the update is on-policy and the ratio π_θ/π_old is 1, so the clip never acts. With
    several minibatches (R1: 16 per rollout batch, one pass), every step after the first trains on samples of a
    policy one or more steps old, the ratio moves off 1 and the clipped objective bounds how far each step can push
    a sampled token's probability: a trust region, and more optimiser steps per (expensive) rollout."""
    forward = forward or model
    adv = group_advantages(batch.rewards, settings.scale_rewards).flatten()
    G = batch.group_size
    informative = batch.rewards.std(dim=1) > 0
    rows = [i for i in range(len(batch.completions)) if informative[i // G] or not settings.dynamic_sampling]
    if not rows:
        return {"loss": 0.0}
    inputs, targets, mask = pack_completions([batch.prompts[i] for i in rows], [batch.completions[i] for i in rows],
                                             batch.pad)
    rollout_lp = torch.zeros(mask.shape).masked_scatter(mask, torch.tensor(
        [x for i in rows for x in batch.logprobs[i]], dtype=torch.float32)) if batch.logprobs else None
    routes = pack_routes([batch.routes[i] for i in rows], inputs.shape[1]) if batch.routes else None
    advantages, T = adv[rows], cfg.temperature
    if batch.step_rewards:  # process supervision: one advantage per completion token, laid out like the mask
        per_token = process_advantages(batch.step_rewards, batch.token_steps, G, to_go=cfg.process_reward != "step")
        advantages = torch.zeros(mask.shape).masked_scatter(mask, torch.cat([per_token[i] for i in rows]))
    minibatches = _minibatches(len(rows), G, cfg.minibatches, cfg.micro_batch)
    chunks = [sl for mb in minibatches for sl in mb]
    route = lambda sl: routes[sl] if routes is not None else None  # noqa: E731
    model.train()
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_logp = torch.cat([completion_logprobs(reference, inputs[sl], targets[sl], mask[sl], T)[0]
                              for sl in chunks]) if reference is not None else None
        reference_s = time.perf_counter() - t0
        old = [completion_logprobs_routed(model, forward, inputs[sl], targets[sl], mask[sl], T, route(sl),
                                          cfg.routing_replay)
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
                logp, ent, mism = completion_logprobs_routed(model, forward, inputs[sl], targets[sl], mask[sl], T,
                                                             route(sl), cfg.routing_replay)
                if old is None:
                    first.append((logp.detach(), ent.detach(), mism))
                old_lp = first[c][0]
                c += 1
                is_w = (old_lp - rollout_lp[sl]).exp().clamp(max=cfg.tis_cap) if cfg.tis_cap and \
                    rollout_lp is not None else None
                ref = ref_logp[sl] if ref_logp is not None else None
                loss, s = grpo_loss(logp, old_lp, advantages[sl], mask[sl], settings.eps_low, settings.eps_high,
                                    settings.beta, ref, settings.loss_norm, cfg.max_new_tokens, is_weight=is_w)
                share = mask[sl].sum() / n_tok if settings.loss_norm == "token" else logp.shape[0] / n_seq
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
                 update_tokens=int((inputs != batch.pad).sum()), optimizer_steps=n_steps)
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
