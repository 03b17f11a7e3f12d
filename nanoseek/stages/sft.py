"""nanoseek sft: supervised fine-tuning and distillation on traces (R1 §2.3.3, §4.1; V3 §5.1).

Each example is prompt + completion (+ eos) with the loss on completion tokens only. Examples are packed into
rows of the model's context with per-sample attention masking and restarted positions (V3's SFT packed with
sample masking). Cosine schedule over the epochs (V3: 5e-6 → 1e-6 at scale). Examples whose question is a
held-out evaluation problem are dropped (by content) and counted. With --teacher, the loss mixes
in logit distillation: KL(teacher ‖ student) at temperature τ on the completion tokens (same tokenizer needed).

    nanoseek sft --init runs/student-base --data runs/traces.jsonl --out runs/distilled --epochs 2
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..losses import IGNORE_INDEX, linear_cross_entropy
from ..optim import build_optimizer, lr_at
from ..options import ComputeOptions, check, check_out_dir, option, own_run
from ..runtime import prepare_for_training, prepare_inference, resolve, set_threads
from ..stats import forward_flops_per_token
from ..tasks import is_heldout, question_from_prompt
from .common import MetricsLog, clear_run, load_checkpoint, save_step, write_run_json


@dataclass(kw_only=True)
class SFTConfig(ComputeOptions):
    """Supervised fine-tuning on prompt/completion traces (cold start, distillation), packed with sample masking;
    --teacher adds logit distillation. Writes OUT/metrics.jsonl and OUT/checkpoints/step_N/."""

    init: str = option(help="starting checkpoint (any nanoseek checkpoint, MoE or dense)")
    data: list[str] = option(help="JSONL files with prompt and completion fields (e.g. from nanoseek sample)")
    out: str = option(help="run directory")
    epochs: int = option(2, help="passes over the data", min=1)
    batch_size: int = option(8, help="packed rows per optimizer step", min=1)
    lr: float = option(3e-4, help="peak learning rate (cosine to --min-lr-ratio)", above=0)
    warmup_steps: int = option(10, help="linear warm-up steps (fresh Adam moments make the first full-rate steps "
                               "the largest: a cold start at 1e-3 without warm-up diverged)", min=0)
    min_lr_ratio: float = option(0.2, help="final lr / peak (V3: 1e-6 / 5e-6)", min=0, max=1)
    weight_decay: float = option(0.0, help="AdamW weight decay", min=0)
    grad_clip: float = option(1.0, help="gradient-norm clip", above=0)
    teacher: str = option("", help="teacher checkpoint for logit distillation (same tokenizer)")
    kd_weight: float = option(0.5, help="share of the distillation loss when --teacher", min=0, max=1)
    kd_temperature: float = option(1.0, help="distillation temperature τ", above=0)
    max_seconds: float = option(0.0, help="stop after this wall time (0: no limit); the cosine then follows "
                                "whichever of steps or time runs out first", min=0)
    max_flops: float = option(0.0, help="train for exactly this compute instead of --epochs (forward + backward "
                              "FLOPs, stats.forward_flops_per_token; 0: use --epochs); the cosine spans it", min=0)
    keep_heldout: bool = option(False, help="keep examples whose question is a held-out evaluation problem "
                                "(dropped by default, by content)")
    seed: int = option(0, help="shuffling seed", min=0)
    force: bool = option(False, help="replace an earlier sft run in --out instead of refusing")

    def __post_init__(self):
        check(self)


def read_examples(patterns: list[str]) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from JSONL files; one-line errors name the file and line."""
    from glob import glob

    files = sorted({f for p in patterns for f in glob(p)})
    if not files:
        raise ValueError(f"no file matches {' '.join(patterns)}")
    out = []
    for f in files:
        for n, line in enumerate(Path(f).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append((str(row["prompt"]), str(row["completion"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{f}:{n}: expected a JSON object with prompt and completion") from None
    if not out:
        raise ValueError(f"{' '.join(files)}: no examples")
    return out


def drop_heldout(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """(the examples whose prompt's question is not held out, how many were dropped): a trace of a held-out
    problem must never reach training, whoever wrote the file."""
    kept = [(p, c) for p, c in pairs if not ((q := question_from_prompt(p)) is not None and is_heldout(q))]
    return kept, len(pairs) - len(kept)


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> list[dict]:
    """First-fit packing of (prompt ids, completion ids) into rows of seq_len next-token pairs."""
    samples = []
    for p, c in examples:
        ids = (p + c)[: seq_len + 1]
        target_is_completion = [i >= len(p) for i in range(1, len(ids))]
        samples.append((ids[:-1], ids[1:], target_is_completion))
    rows: list[list] = []
    for s in sorted(samples, key=lambda s: -len(s[0])):
        row = next((r for r in rows if sum(len(x[0]) for x in r) + len(s[0]) <= seq_len), None)
        (row.append(s) if row is not None else rows.append([s]))
    packed = []
    for row in rows:
        inputs, targets, positions, segments = [], [], [], []
        for seg, (x, y, m) in enumerate(row):
            inputs += x
            targets += [t if keep else IGNORE_INDEX for t, keep in zip(y, m)]
            positions += list(range(len(x)))
            segments += [seg] * len(x)
        fill = seq_len - len(inputs)
        packed.append({"inputs": inputs + [pad] * fill, "targets": targets + [IGNORE_INDEX] * fill,
                       "positions": positions + [0] * fill, "segments": segments + [-1] * fill})
    return packed


def _progress_step(step: int, total: int, elapsed: float, max_seconds: float) -> int:
    """The step the schedule is at: with a time limit, the further along of steps and wall time, so a run cut
    short by --max-seconds still completes its cosine (at the cost of bit-reproducible learning rates)."""
    if not max_seconds:
        return step
    return min(total - 1, max(step, int(elapsed / max_seconds * total)))


def _batch(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def _kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(teacher || student) over the rows (Hinton et al. 2015), in fp32."""
    return F.kl_div((s_logits.float() / tau).log_softmax(-1), (t_logits.float() / tau).log_softmax(-1),
                    log_target=True, reduction="batchmean") * tau * tau


def _losses(forward, teacher, b: dict, tau: float):
    """(cross-entropy, distillation loss or None) of a packed batch, both from the student's one forward."""
    mask = b["targets"] != IGNORE_INDEX
    t_logits = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(b["inputs"], positions=b["positions"], segments=b["segments"],
                               head=lambda h, weight, k: F.linear(h[mask], weight))

    def head(h, weight, k):
        ce = linear_cross_entropy(h.flatten(0, 1), weight, b["targets"].flatten())
        return ce, (_kd_loss(F.linear(h[mask], weight), t_logits, tau) if t_logits is not None else None)

    return forward(b["inputs"], positions=b["positions"], segments=b["segments"], head=head)


def run(cfg: SFTConfig) -> Path:
    set_threads(cfg.threads)
    out = Path(cfg.out)
    check_out_dir(out, "--out", own=own_run(out, "sft"), force=cfg.force)
    model, tokenizer = load_checkpoint(cfg.init)
    rt = resolve(cfg.device, cfg.precision, training=True)
    forward = prepare_for_training(model.to(rt.device), rt)  # bf16 compute copies of fp32 masters, or the model
    teacher = ckpt.load(cfg.teacher)[0].eval().requires_grad_(False) if cfg.teacher else None
    if teacher is not None and teacher.cfg.vocab_size != model.cfg.vocab_size:
        raise ValueError("logit distillation needs teacher and student to share the tokenizer (vocab sizes differ)")
    if teacher is not None:
        teacher = prepare_inference(teacher, rt)
    pairs, dropped = read_examples(cfg.data), 0
    if not cfg.keep_heldout:
        pairs, dropped = drop_heldout(pairs)
        print(f"sft: dropped {dropped} of {len(pairs) + dropped} examples whose question is held out",
              file=sys.stderr)
        if not pairs:
            raise ValueError(f"{' '.join(cfg.data)}: every example's question is held out; nothing to train on")
    encoded = [(tokenizer.encode(p), tokenizer.encode(c) + [tokenizer.eos_id]) for p, c in pairs]
    rows = pack(encoded, model.cfg.max_seq_len, tokenizer.pad_id)
    if cfg.force:  # only now that the inputs are known good
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_json(out, "sft", {**dataclasses.asdict(cfg), "examples": len(pairs), "dropped_heldout": dropped,
                                "runtime": rt.describe()})
    model.mtp.requires_grad_(False)  # packed samples would leak through the MTP's look-ahead; it is not trained
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    step_flops = _flops_per_step(model.cfg, encoded, rows, cfg.batch_size)
    total = math.ceil(cfg.max_flops / step_flops) if cfg.max_flops else cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    log, gen = MetricsLog(out / "metrics.jsonl"), torch.Generator().manual_seed(cfg.seed)
    t_start, step = time.perf_counter(), 0
    bar = tqdm(total=total, desc="sft", unit="step", dynamic_ncols=True)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        for i in range(0, len(rows), cfg.batch_size):
            b = {k: v.to(rt.device) for k, v in _batch([rows[j] for j in order[i:i + cfg.batch_size]]).items()}
            lr = lr_at(_progress_step(step, total, time.perf_counter() - t_start, cfg.max_seconds), total, cfg.lr,
                       warmup=min(1.0, cfg.warmup_steps / total), decay_start=0.0, decay_end=1.0, min_ratio=cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            ce, kd = _losses(forward, teacher, b, cfg.kd_temperature)
            loss, record = ce, {"step": step + 1, "epoch": epoch + 1, "loss": ce.item(), "lr": lr}
            if kd is not None:
                loss = (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd
                record["kd_loss"] = kd.item()
            loss.backward()
            record["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            record["tokens"] = int((b["targets"] != IGNORE_INDEX).sum())
            record["flops_total"] = (step + 1) * step_flops
            log.write(record)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if step == total or (cfg.max_seconds and time.perf_counter() - t_start > cfg.max_seconds):
                break
        if step == total or (cfg.max_seconds and time.perf_counter() - t_start > cfg.max_seconds):
            break
    bar.close()
    return save_step(out, step, model.eval(), tokenizer, {"stage": "sft", "init": str(cfg.init),
                                                           "examples": len(pairs), "rows": len(rows),
                                                           "dropped_heldout": dropped, "flops": step * step_flops,
                                                           **rt.checkpoint_meta()})


def _flops_per_step(cfg, encoded: list[tuple[list[int], list[int]]], rows: list[dict], batch_size: int) -> float:
    """Forward + backward FLOPs of one step, counted on the mean step: every real (non-padding) token of a row
    costs 3 forwards at the mean example length (attention is masked per example). The same count for every step
    makes a --max-flops run's length known in advance, so its cosine can span it."""
    tokens_per_row = sum(len(p) + len(c) - 1 for p, c in encoded) / len(rows)
    context = sum(len(p) + len(c) for p, c in encoded) / len(encoded)
    return 3 * forward_flops_per_token(cfg, context) * tokens_per_row * min(batch_size, len(rows))
