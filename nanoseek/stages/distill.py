"""nanoseek distill: on-policy distillation -- the student samples, the teacher grades every token.

Per step: fresh training problems → the student samples completions (its own policy, temperature 1) → the
teacher scores every position of those completions → the student minimises the per-token reverse KL to the
teacher's full next-token distribution there (losses.reverse_kl; Agarwal et al. 2024, arXiv 2306.13649;
DeepSeek-V4's post-training distils its specialists into one model this way). Unlike SFT on the teacher's
traces, the student learns on the states it actually reaches, mistakes included; unlike RL, every token gets
a dense signal instead of one reward per sample. The task's verifier is only read, never trained on: the
student's accuracy on its own samples is logged as a progress signal.

    nanoseek distill --init runs/student --teacher runs/rl --task chain_sum --out runs/onpolicy --steps 100

Compute is counted as FLOPs (stats.forward_flops_per_token): the student's sampling and update in `flops`, the
teacher's scoring separately in `teacher_flops`; --max-flops stops the run at a student budget, so that arms
of a comparison can be given equal compute.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load, recorded_precision
from ..engine import Engine, SamplingParams, sequence_seed
from ..errors import Interrupted
from ..losses import reverse_kl
from ..metrics import TENSORBOARD_HELP, check_tensorboard
from ..optim import build_optimizer
from ..options import ComputeOptions, check, check_out_dir, option, own_run
from ..rollouts import completion_logits, pack_completions
from ..runtime import prepare_for_training, prepare_inference, resolve, set_threads
from ..stats import forward_flops_per_token
from ..tasks import TASKS, get_task
from ..template import STOP
from . import resume
from .common import MetricsLog, StopRequest, clear_run, write_run_json
from .progress import StageBar


@dataclass(kw_only=True)
class DistillConfig(ComputeOptions, resume.Resumable):
    """On-policy distillation on a task's training problems: student samples, per-token reverse KL to the teacher.
    Writes OUT/metrics.jsonl and OUT/checkpoints/step_N/."""

    command = "distill"
    required = ("init", "teacher", "task")
    # limits a --resume may raise: the lr is constant after its warm-up, so a longer run is the same run, continued
    extendable = ("steps", "max_flops")

    init: str = option("", help="student checkpoint to start from (default: none; required unless --resume)")
    teacher: str = option("", help="teacher checkpoint, sharing the student's tokenizer (default: none; required "
                          "unless --resume)")
    task: str = option("", help="task family whose training-split prompts the student answers (default: none; "
                       "required unless --resume)", choices=("", *TASKS))
    out: str = option(help="run directory")
    task_args: dict = option(default_factory=dict, help='generator options as JSON, e.g. {"max_terms": 2}')
    steps: int = option(100, help="steps (one batch of student samples each)", min=1)
    prompts_per_step: int = option(16, help="distinct prompts per step", min=1)
    samples: int = option(2, help="student samples per prompt", min=1)
    temperature: float = option(1.0, help="the student's sampling temperature (1: its own policy)", above=0)
    max_new_tokens: int = option(96, help="response length limit", min=1)
    lr: float = option(1e-3, help="learning rate (constant after --warmup-steps)", above=0)
    warmup_steps: int = option(5, help="linear warm-up steps", min=0)
    grad_clip: float = option(1.0, help="gradient-norm clip", above=0)
    max_flops: float = option(0.0, help="stop once the student's FLOPs (sampling + update) reach this (0: no "
                              "limit)", min=0)
    save_every: int = option(1000, help="checkpoint every N steps (and at the end), for --resume", min=1)
    seed: int = option(0, help="seed for problems and sampling", min=0)
    resume: bool = option(False, help="continue the run in --out from its latest checkpoint, exactly (a larger "
                          "--steps or --max-flops extends it; Ctrl-C saves a checkpoint first)")
    force: bool = option(False, help="replace an earlier distill run in --out instead of refusing")
    tensorboard: str = option("", help=TENSORBOARD_HELP, metavar="DIR")

    def __post_init__(self):
        check(self)
        check_tensorboard(self.tensorboard)
        self.check_resume()


def run(cfg: DistillConfig) -> Path:
    set_threads(cfg.threads)
    out = Path(cfg.out)
    check_out_dir(out, "--out", own=own_run(out, "distill"), resumable=cfg.resume, force=cfg.force)
    saved = resume.latest(out) if cfg.resume else None  # nothing to resume from is refused before the models load
    if saved and _done(cfg, saved[1]):
        return resume.nothing_to_do(saved[0], saved[1]["step"])
    task = get_task(cfg.task, **cfg.task_args)
    student, tokenizer = load(cfg.init, require_tokenizer=True)
    teacher, teacher_tok = load(cfg.teacher, require_tokenizer=True)
    if teacher_tok.vocab_size != tokenizer.vocab_size or teacher_tok.encode("1 + 2") != tokenizer.encode("1 + 2"):
        raise ValueError(f"--teacher {cfg.teacher}: its tokenizer differs from the student's; on-policy distillation "
                         "compares next-token distributions, so both must share one")
    if cfg.force:
        clear_run(out)
    return train(student, teacher, tokenizer, task, cfg, out, saved)


def _done(cfg: DistillConfig, state: dict) -> bool:
    """Whether a run at `state` has reached its --steps or --max-flops."""
    return state["step"] >= cfg.steps or bool(cfg.max_flops and state["flops"] >= cfg.max_flops)


def train(student, teacher, tokenizer, task, cfg: DistillConfig, out: Path, saved=None) -> Path:
    """The loop on loaded models; returns the last checkpoint. `saved` (resume.latest of `out`) continues that run
    exactly."""
    out.mkdir(parents=True, exist_ok=True)
    r = _Run(student, teacher, tokenizer, task, cfg, out, saved)
    state, path = r.state, None
    bar = StageBar(f"distill {cfg.task}", cfg.steps, state["step"], max_flops=cfg.max_flops, flops=state["flops"])
    with StopRequest() as stop:  # Ctrl-C stops at the next step boundary
        while True:
            if stop.requested:  # the last finished step is saved, then the command ends with status 130
                path = r.save(finished=False)
                bar.close()
                raise Interrupted(f"interrupted after step {state['step']}; saved {path} (continue with --resume)")
            record = r.step()
            r.log.write(record)
            bar.update(state["step"], flops=state["flops"], kl=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            last = _done(cfg, state)
            if state["step"] % cfg.save_every == 0 or last:
                path = r.save(finished=last)
            if last:
                break
    bar.close()
    r.log.close()
    return path


class _Run:
    """A distill run's moving parts (the student, the teacher, the engine, the optimizer, the problem stream) and
    what a checkpoint carries so that a resumed run continues exactly: the optimizer, the stream, the random
    generators, the step, the sequences sampled (they number the sampling seeds) and the FLOPs (--max-flops counts
    every session)."""

    def __init__(self, student, teacher, tokenizer, task, cfg: DistillConfig, out: Path, saved=None):
        self.student, self.tokenizer, self.task, self.cfg, self.out = student, tokenizer, task, cfg, out
        torch.manual_seed(cfg.seed)
        student.mtp.requires_grad_(False)  # the next-token policy is distilled; an MTP drafter stays as it was
        self.rt = rt = resolve(cfg.device, cfg.precision, training=True, recorded=recorded_precision(cfg.init))
        student.to(rt.device)
        self.forward = prepare_for_training(student, rt)
        self.teacher = prepare_inference(teacher, rt).eval().requires_grad_(False)
        write_run_json(out, "distill", {**dataclasses.asdict(cfg), "runtime": rt.describe()})
        self.engine = Engine(student, tokenizer)
        self.optimizer = build_optimizer(student, cfg.lr, weight_decay=0.0)
        self.log, self.stream = MetricsLog(out / "metrics.jsonl", cfg.tensorboard), task.stream(cfg.seed, "train")
        self.state = {"step": 0, "sequences": 0, "flops": 0.0, "teacher_flops": 0.0}
        if saved is not None:
            self._restore(*saved)

    def step(self) -> dict:
        """One step: sample, score, update; returns its metrics record."""
        cfg, state = self.cfg, self.state
        lr = cfg.lr * min(1.0, (state["step"] + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        record = _step(self.student, self.teacher, self.forward, self.optimizer, self.engine, self.task, self.stream,
                       cfg, state["sequences"])
        state["sequences"] += cfg.prompts_per_step * cfg.samples
        state["flops"] += record["flops"]
        state["teacher_flops"] += record["teacher_flops"]
        state["step"] += 1
        record.update(step=state["step"], lr=lr, problems_seen=len(self.stream.seen), flops_total=state["flops"],
                      teacher_flops_total=state["teacher_flops"])
        return record

    def save(self, finished: bool) -> Path:
        # a finished run keeps its optimizer too: a larger --steps or --max-flops continues it
        state = {**self.state, "finished": finished, "optimizer": self.optimizer.state_dict(),
                 "stream": resume.stream_state(self.stream), "rng": resume.rng_state()}
        meta = {"stage": "distill", "init": str(self.cfg.init), "teacher": str(self.cfg.teacher),
                "flops": self.state["flops"], "teacher_flops": self.state["teacher_flops"], **self.rt.checkpoint_meta()}
        return resume.save(self.out, self.state["step"], self.student, self.tokenizer, meta, state)

    def _restore(self, path: Path, saved: dict) -> None:
        resume.check_precision(path, self.rt.precision)
        resume.load_weights(path, self.student)
        self.optimizer.load_state_dict(saved["optimizer"])
        resume.load_stream_state(self.stream, saved["stream"])
        resume.set_rng_state(saved["rng"])
        self.state = {k: saved[k] for k in self.state}
        self.log.truncate_after(self.state["step"])  # a killed run may have logged steps past its checkpoint
        print(f"resumed from {path} (step {self.state['step']})", file=sys.stderr)


def _step(student, teacher, forward, optimizer, engine, task, stream, cfg: DistillConfig, first_seq: int) -> dict:
    """Sample, score with the teacher, one optimiser step; returns the step's metrics."""
    problems = stream.take(cfg.prompts_per_step)
    prompts = [task.prompt(p) for p in problems for _ in range(cfg.samples)]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop=list(STOP))
    t0 = time.perf_counter()
    student.eval()
    gens = engine.generate(prompts, params, seeds=[sequence_seed(cfg.seed, first_seq + i) for i in range(len(prompts))])
    rollout_s = time.perf_counter() - t0
    scores = [task.score(problems[i // cfg.samples], g.text) for i, g in enumerate(gens)]
    inputs, targets, mask = pack_completions([g.prompt_tokens for g in gens], [g.tokens for g in gens],
                                             engine.tokenizer.pad_id)
    with torch.no_grad():
        t_logits = completion_logits(teacher, inputs, mask)
    student.train()
    kl = reverse_kl(completion_logits(forward, inputs, mask), t_logits)  # (N,) one per completion token
    loss = kl.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad],
                                               cfg.grad_clip).item()
    optimizer.step()
    student.eval()
    tokens = sum(len(g.prompt_tokens) + len(g.tokens) for g in gens)
    context = tokens / len(gens)
    s_fwd, t_fwd = forward_flops_per_token(student.cfg, context), forward_flops_per_token(teacher.cfg, context)
    return {"loss": loss.item(), "kl_max": kl.max().item(), "grad_norm": grad_norm,
            "accuracy": sum(s["accuracy"] for s in scores) / len(scores),
            "format": sum(s["format"] for s in scores) / len(scores),
            "response_len": sum(len(g.tokens) for g in gens) / len(gens), "rollout_s": rollout_s,
            "step_s": time.perf_counter() - t0,
            # the student samples (one forward per token) and trains (forward + backward: 3x) on every token
            "flops": 4 * s_fwd * tokens, "teacher_flops": t_fwd * tokens,
            "problems": [p.id for p in problems]}
