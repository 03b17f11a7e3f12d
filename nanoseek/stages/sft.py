"""nanoseek sft: supervised fine-tuning and distillation on traces (R1 §2.3.3, §4.1; V3 §5.1).

Each example is prompt + completion (+ eos) with the loss on completion tokens only; a chat row (`messages`, as
OpenAI and TRL datasets write them) is rendered in the R1 chat template (template.conversation) with the loss on
its assistant turns only. Examples are packed into rows of the model's context with per-sample attention masking
and restarted positions (V3's SFT packed with sample masking). Cosine schedule over the epochs (V3: 5e-6 → 1e-6
at scale). Examples whose question is a held-out evaluation problem are dropped (by content) and counted. With
--teacher, the loss mixes in logit distillation: KL(teacher ‖ student) at temperature τ on the completion tokens
(same tokenizer needed).

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
from .. import checkpoint as ckpt
from ..errors import Interrupted
from ..losses import IGNORE_INDEX, linear_cross_entropy
from ..optim import build_optimizer, lr_at
from ..options import ComputeOptions, check, check_out_dir, option, own_run
from ..runtime import prepare_for_training, prepare_inference, resolve, set_threads
from ..stats import forward_flops_per_token
from ..metrics import TENSORBOARD_HELP, check_tensorboard
from ..tasks import is_heldout, question_from_prompt
from ..template import ANSWER, END_ANSWER, END_THINK, TAGS, THINK, conversation, r1_completion, split_reasoning
from . import resume
from .common import MetricsLog, StopRequest, clear_run, write_run_json
from .progress import StageBar


@dataclass(kw_only=True)
class SFTConfig(ComputeOptions, resume.Resumable):
    """Supervised fine-tuning on prompt/completion traces (cold start, distillation) or chats (loss on the assistant
    turns), packed with sample masking; --teacher adds logit distillation. Writes OUT/metrics.jsonl and
    OUT/checkpoints/step_N/."""

    command = "sft"
    required = ("init", "data")

    init: str = option("", help="starting checkpoint, any nanoseek checkpoint, MoE or dense (default: none; required "
                       "unless --resume)")
    data: list[str] = option(default_factory=list, help="JSONL files of prompt/completion rows (e.g. from nanoseek "
                             "sample) or chat rows {\"messages\": [{\"role\", \"content\"}, ...]} trained on their "
                             "assistant turns; a file may mix both (default: none; required unless --resume)")
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
    save_every: int = option(0, help="also checkpoint every N steps, for --resume (0: only at the end)", min=0)
    resume: bool = option(False, help="continue the run in --out from its latest checkpoint, exactly (Ctrl-C saves "
                          "a checkpoint first)")
    force: bool = option(False, help="replace an earlier sft run in --out instead of refusing")
    tensorboard: str = option("", help=TENSORBOARD_HELP, metavar="DIR")

    def __post_init__(self):
        check(self)
        check_tensorboard(self.tensorboard)
        self.check_resume()



ROW_FORMATS = 'a JSON object with prompt and completion, or with messages ([{"role": ..., "content": ...}, ...])'


def read_examples(patterns: list[str]) -> list[tuple[str, ...]]:
    """The examples of JSONL files, each a tuple of texts that alternate context and trained text: (prompt,
    completion) for a prompt/completion row, a chat row's turns for a `messages` row (chat_examples). Both kinds
    may share a file: each row says which it is. One-line errors name the file and line."""
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
                out += _row_examples(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{f}:{n}: not JSON; expected {ROW_FORMATS}") from None
            except ValueError as e:
                raise ValueError(f"{f}:{n}: {e}") from None
    if not out:
        raise ValueError(f"{' '.join(files)}: no examples")
    return out


def _row_examples(row) -> list[tuple[str, ...]]:
    if isinstance(row, dict) and "messages" in row:
        if "prompt" in row or "completion" in row:
            raise ValueError("a row has either messages or prompt and completion, not both")
        return chat_examples(row["messages"])
    if not (isinstance(row, dict) and "prompt" in row and "completion" in row):
        raise ValueError(f"expected {ROW_FORMATS}")
    return [(str(row["prompt"]), str(row["completion"]))]


def chat_examples(messages) -> list[tuple[str, ...]]:
    """A chat's examples in the R1 chat template, with the loss on the assistant turns only (TRL's assistant-only
    loss). An example alternates context (what template.conversation renders up to "Assistant: <think>") and an
    assistant reply, so one forward trains every reply of a conversation. Later context shows an earlier reply
    as conversation() does, by its answer alone (R1 drops reasoning from the history, and chat/serve send it so);
    a reply that carries reasoning is trained with it, so it ends its example and the next example starts over
    from the whole conversation so far."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in messages):
        raise ValueError('messages must be a list of {"role": ..., "content": TEXT} objects')
    roles = [m.get("role") for m in messages]
    for k, role in enumerate(roles):
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{k}]: unknown role {role!r} (system, user or assistant)")
        if role == "system" and k > 0:
            raise ValueError(f"messages[{k}]: a system message must come first")
        if role == "assistant" and (k == 0 or roles[k - 1] != "user"):
            raise ValueError(f"messages[{k}]: an assistant turn must follow a user turn")
    if "assistant" not in roles:
        raise ValueError("the conversation has no assistant turn (the loss is on assistant turns only)")
    examples, pieces, shown = [], [], ""
    for k in (k for k, role in enumerate(roles) if role == "assistant"):
        context = conversation(messages[:k])
        assert context.startswith(shown)  # the history conversation() renders extends the example so far
        reasoning, answer = _reply(messages[k], k)
        reply = r1_completion(reasoning, answer) if reasoning else f" {END_THINK} {ANSWER} {answer} {END_ANSWER}"
        pieces += [context[len(shown):], reply]
        shown = context + reply
        if reasoning:  # the history will show this reply without its reasoning: the example ends here
            examples.append(tuple(pieces))
            pieces, shown = [], ""
    return examples + ([tuple(pieces)] if pieces else [])


def _reply(message: dict, k: int) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: DeepSeek's API returns the reasoning in `reasoning_content`,
    R1-style traces write it inline as "<think> … </think> answer" (an <answer> tag around the answer optional)."""
    content, reasoning = message["content"].strip(), str(message.get("reasoning_content") or "").strip()
    if END_THINK in content:
        if reasoning:
            raise ValueError(f"messages[{k}]: reasoning both in reasoning_content and inside content; give one")
        reasoning, content = split_reasoning(content.removeprefix(THINK))
    if any(tag in text for tag in TAGS for text in (reasoning, content)):
        raise ValueError(f"messages[{k}]: misplaced {'/'.join(TAGS)} tags; give the answer, optionally after "
                         f"'{THINK} reasoning {END_THINK}' (the template adds the rest)")
    return reasoning, content


def drop_heldout(examples: list[tuple[str, ...]]) -> tuple[list[tuple[str, ...]], int]:
    """(the examples none of whose contexts asks a held-out question, how many were dropped): a trace of a
    held-out problem must never reach training, whoever wrote the file."""
    def heldout(context: str) -> bool:
        return (q := question_from_prompt(context)) is not None and is_heldout(q)

    kept = [e for e in examples if not any(heldout(context) for context in e[::2])]
    return kept, len(examples) - len(kept)


def encode(tokenizer, example: tuple[str, ...]) -> tuple[list[int], ...]:
    """An example's texts as token ids, each piece on its own (a context ends in the <think> tag, a reply in
    </answer>: special tokens, so the pieces encode as the whole text would), with eos closing the last reply."""
    *head, last = (tokenizer.encode(text) for text in example)
    return (*head, last + [tokenizer.eos_id])


def pack(examples: list[tuple[list[int], ...]], seq_len: int, pad: int) -> list[dict]:
    """First-fit packing of examples into rows of seq_len next-token pairs. An example's token lists alternate
    context and trained text ((prompt, completion), or a chat's turns); the loss is on the trained ones only."""
    samples = []
    for pieces in examples:
        ids = [t for piece in pieces for t in piece][: seq_len + 1]
        trained = [i % 2 == 1 for i, piece in enumerate(pieces) for _ in piece][: seq_len + 1]
        samples.append((ids[:-1], ids[1:], trained[1:]))
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
    check_out_dir(out, "--out", own=own_run(out, "sft"), resumable=cfg.resume, force=cfg.force)
    saved = resume.latest(out) if cfg.resume else None
    if saved and saved[1]["finished"]:  # nothing extends an SFT run: its cosine spans the whole of it
        return resume.nothing_to_do(saved[0], saved[1]["step"])
    model, tokenizer = ckpt.load(cfg.init, require_tokenizer=True)
    rt = resolve(cfg.device, cfg.precision, training=True, recorded=ckpt.recorded_precision(cfg.init))
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
    encoded = [encode(tokenizer, e) for e in pairs]
    rows = pack(encoded, model.cfg.max_seq_len, tokenizer.pad_id)
    if cfg.force:  # only now that the inputs are known good
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_json(out, "sft", {**dataclasses.asdict(cfg), "examples": len(pairs), "dropped_heldout": dropped,
                                "runtime": rt.describe()})
    model.mtp.requires_grad_(False)  # packed samples would leak through the MTP's look-ahead; it is not trained
    opt = build_optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    step_flops = _flops_per_step(model.cfg, encoded, rows, cfg.batch_size)
    total = math.ceil(cfg.max_flops / step_flops) if cfg.max_flops else cfg.epochs * math.ceil(len(rows) /
                                                                                             cfg.batch_size)
    meta = {"stage": "sft", "init": str(cfg.init), "examples": len(pairs), "rows": len(rows),
            "dropped_heldout": dropped, **rt.checkpoint_meta()}
    job = _Job(model, forward, teacher, tokenizer, opt, rows, total, step_flops, meta, out, cfg)
    if saved is not None:
        job.restore(*saved, rt.precision)
    return job.train()


class _Order:
    """Which rows each step trains on: a fresh permutation of the rows every epoch from one seeded generator,
    drawn as the epoch starts. Its state (generator, epoch, permutation, position) travels in a checkpoint."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n, self.batch_size = n_rows, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.pos, self.order = 0, n_rows, []  # at the end of "epoch 0": the first batch draws epoch 1

    def next(self) -> tuple[int, list[int]]:
        """(epoch, the rows of the next batch)."""
        if self.pos >= self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
            self.epoch += 1
        rows = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.epoch, rows

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "epoch": self.epoch, "pos": self.pos, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.epoch, self.pos, self.order = state["epoch"], state["pos"], state["order"]


class _Job:
    """The SFT loop over packed rows, with what a checkpoint carries for --resume to continue it exactly: the
    optimizer, the data order, the step and the seconds trained (the time limit counts every session)."""

    def __init__(self, model, forward, teacher, tokenizer, opt, rows, total, step_flops, meta, out, cfg):
        self.model, self.forward, self.teacher, self.tokenizer, self.opt = model, forward, teacher, tokenizer, opt
        self.rows, self.total, self.step_flops, self.meta, self.out, self.cfg = rows, total, step_flops, meta, out, cfg
        self.order = _Order(len(rows), cfg.batch_size, cfg.seed)
        self.log, self.step, self.seconds = MetricsLog(out / "metrics.jsonl", cfg.tensorboard), 0, 0.0

    def train(self) -> Path:
        cfg, total, model = self.cfg, self.total, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        device = next(model.parameters()).device
        bar = StageBar("sft", total, self.step, cfg.max_seconds, seconds=self.seconds)
        t_start = time.perf_counter() - self.seconds
        model.train()
        with StopRequest() as stop:  # Ctrl-C stops at the next step boundary
            while True:
                if stop.requested:  # the last finished step is saved, then the command ends with status 130
                    path = self.save(finished=False)
                    bar.close()
                    raise Interrupted(f"interrupted after step {self.step}; saved {path} (continue with --resume)")
                epoch, batch_rows = self.order.next()
                b = {k: v.to(device) for k, v in _batch([self.rows[j] for j in batch_rows]).items()}
                lr = lr_at(_progress_step(self.step, total, time.perf_counter() - t_start, cfg.max_seconds), total,
                           cfg.lr, warmup=min(1.0, cfg.warmup_steps / total), decay_start=0.0, decay_end=1.0,
                           min_ratio=cfg.min_lr_ratio)
                record = {"step": self.step + 1, "epoch": epoch, **_step(self.forward, self.teacher, self.opt,
                                                                          params, b, lr, cfg)}
                self.step += 1
                record["flops_total"] = self.step * self.step_flops
                self.log.write(record)
                self.seconds = time.perf_counter() - t_start
                bar.update(self.step, self.seconds, loss=f"{record['loss']:.3f}")
                if self.step == total or (cfg.max_seconds and self.seconds > cfg.max_seconds):
                    break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save(finished=False)
        bar.close()
        self.log.close()
        model.eval()
        return self.save(finished=True)

    def save(self, finished: bool) -> Path:
        # a finished run is never continued: its checkpoint keeps no optimizer state (a third of the size)
        state = {"step": self.step, "seconds": self.seconds, "finished": finished}
        if not finished:
            state.update(optimizer=self.opt.state_dict(), order=self.order.state_dict(), rng=resume.rng_state())
        meta = {**self.meta, "flops": self.step * self.step_flops}
        return resume.save(self.out, self.step, self.model, self.tokenizer, meta, state)

    def restore(self, path: Path, saved: dict, precision: str) -> None:
        resume.check_precision(path, precision)
        resume.load_weights(path, self.model)
        self.opt.load_state_dict(saved["optimizer"])
        self.order.load_state_dict(saved["order"])
        resume.set_rng_state(saved["rng"])
        self.step, self.seconds = saved["step"], saved["seconds"]
        self.log.truncate_after(self.step)  # a killed run may have logged steps past its checkpoint
        print(f"resumed from {path} (step {self.step})", file=sys.stderr)


def _step(forward, teacher, opt, params, b: dict, lr: float, cfg: SFTConfig) -> dict:
    """One optimiser step on a packed batch; returns its metrics."""
    for g in opt.param_groups:
        g["lr"] = lr
    ce, kd = _losses(forward, teacher, b, cfg.kd_temperature)
    loss, record = ce, {"loss": ce.item(), "lr": lr}
    if kd is not None:
        loss = (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd
        record["kd_loss"] = kd.item()
    loss.backward()
    record["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    record["tokens"] = int((b["targets"] != IGNORE_INDEX).sum())
    return record


def _flops_per_step(cfg, encoded: list[tuple[list[int], ...]], rows: list[dict], batch_size: int) -> float:
    """Forward + backward FLOPs of one step, counted on the mean step: every real (non-padding) token of a row
    costs 3 forwards at the mean example length (attention is masked per example). The same count for every step
    makes a --max-flops run's length known in advance, so its cosine can span it."""
    lengths = [sum(map(len, e)) for e in encoded]
    tokens_per_row = sum(n - 1 for n in lengths) / len(rows)
    context = sum(lengths) / len(encoded)
    return 3 * forward_flops_per_token(cfg, context) * tokens_per_row * min(batch_size, len(rows))
