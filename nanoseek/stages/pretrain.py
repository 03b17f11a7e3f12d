"""nanoseek pretrain: DeepSeek-V3's pretraining recipe at any scale, stoppable and resumable at any moment.

Top to bottom: prepare data (corpus → tokenizer → token streams), build the model, then loop: batch →
forward with the router log → next-token + λ·MTP + α·balance loss → backward (accumulated over micro-batches)
→ clip → AdamW → auxiliary-loss-free bias update → metrics → held-out eval → atomic checkpoint.

    nanoseek pretrain --preset small --out runs/base --steps 600
    nanoseek pretrain --out runs/base --resume          # continue a killed run, bit-identically on CPU
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..config import PRESETS, get_preset
from ..errors import Interrupted, StageError
from ..options import ComputeOptions, check, check_out_dir, option, own_run
from .. import dist as ddp
from ..corpus import EASY
from ..data import PackedLoader, fixed_batches
from ..fp8 import RECIPES, convert_to_fp8
from ..losses import balance_loss, document_segments, lm_loss
from ..metrics import TENSORBOARD_HELP, check_tensorboard
from ..generations import build_model
from ..model import Gate, RouterLog, Transformer
from ..sparse import IndexerLog
from ..optim import (batch_size_at, build_optimizer, expert_loads, lr_at, max_violation, mtp_lambda_at,
                     update_routing_bias)
from ..runtime import Runtime, matmul_peak, pick_device, prepare_for_training, resolve, set_threads
from ..stats import train_flops_per_token
from ..tokenizer import MIN_VOCAB
from .common import MetricsLog, StopRequest, clear_run, write_run_json
from . import resume
from .pretrain_data import prepare_data
from .resume import read_run


@dataclass(kw_only=True)
class PretrainConfig(ComputeOptions):
    """DeepSeek-V3's pretraining recipe: AdamW, warm-up/constant/cosine/tail schedule, MTP, auxiliary-loss-free
    balancing; atomic checkpoints; --resume continues a stopped run exactly (Ctrl-C saves a checkpoint first); runs
    under torchrun for data and expert parallelism. Writes OUT/metrics.jsonl and OUT/checkpoints/step_N/."""

    out: str = option(help="run directory (checkpoints, metrics.jsonl, data cache)")
    preset: str = option("small", help="model preset", choices=tuple(PRESETS))
    data: list[str] = option(default_factory=list, help="text/JSONL/Parquet files or globs (default: the embedded "
                             "corpus)")
    tokenizer: str = option("", help="use this tokenizer.json instead of training one")
    vocab_size: int = option(0, help="tokenizer vocabulary to train (0: the preset's)", min=0)
    seq_len: int = option(0, help="training sequence length (0: the preset's max_seq_len)", min=0)
    steps: int = option(300, help="optimizer steps", min=1)
    batch_size: int = option(16, help="sequences per optimizer step", min=1)
    micro_batch: int = option(0, help="sequences per forward pass (gradient accumulation); 0: batch_size", min=0)
    batch_start: int = option(0, help="batch-size ramp: sequences per step at the start (0: no ramp)", min=0)
    batch_ramp: float = option(0.0, help="batch-size ramp: fraction of the run to reach --batch-size", min=0, max=1)
    lr: float = option(3e-3, help="peak learning rate", above=0)
    min_lr_ratio: float = option(0.1, help="final lr / peak lr (V3: 0.1)", min=0, max=1)
    warmup: float = option(0.02, help="fraction of steps in linear warm-up", min=0, max=1)
    decay_start: float = option(0.676, help="fraction where cosine decay starts (V3: 10T/14.8T)", min=0, max=1)
    decay_end: float = option(0.966, help="fraction where the constant tail starts (V3: 14.3T/14.8T)", min=0, max=1)
    weight_decay: float = option(0.1, help="AdamW weight decay", min=0)
    beta1: float = option(0.9, help="AdamW beta1", min=0, below=1)
    beta2: float = option(0.95, help="AdamW beta2", min=0, below=1)
    grad_clip: float = option(1.0, help="gradient-norm clip", above=0)
    mtp_lambda: float = option(0.3, help="MTP loss weight λ (V3: 0.3)", min=0)
    mtp_lambda_final: float = option(0.1, help="λ after --mtp-switch (V3: 0.1)", min=0)
    mtp_switch: float = option(0.676, help="fraction of the run where λ changes", min=0, max=1)
    balance: str = option("aux-free", help="aux-free (V3: bias update + sequence-wise loss), aux-loss (batch-level "
                          "auxiliary loss only) or none", choices=("aux-free", "aux-loss", "none"))
    bias_update_speed: float = option(0.001, help="γ of the bias update (V3: 0.001)", min=0)
    bias_update_stop: float = option(0.966, help="fraction of the run after which γ = 0", min=0, max=1)
    seq_balance_alpha: float = option(1e-4, help="α of V3's sequence-wise balance loss (aux-free mode)", min=0)
    aux_loss_alpha: float = option(0.01, help="α of the batch-level auxiliary loss (aux-loss mode)", min=0)
    eval_every: int = option(50, help="held-out loss every N steps (0: only at the end)", min=0)
    eval_batches: int = option(8, help="held-out batches per evaluation", min=0)
    save_every: int = option(100, help="checkpoint every N steps (and at the end)", min=1)
    keep: int = option(2, help="checkpoints to keep (0: all)", min=0)
    seed: int = option(0, help="seed for initialisation and data order", min=0)
    data_seed: int = option(0, help="seed of the embedded corpus", min=0)
    n_problems: int = option(6000, help="reasoning documents in the embedded corpus", min=0)
    natural_share: float = option(1.0, help="share of the embedded corpus's natural English documents kept",
                                  min=0, max=1)
    easy_problems: int = option(0, help="extra worked chain_sum problems (training split) in the embedded corpus",
                                min=0)
    easy_args: dict = option(default_factory=lambda: dict(EASY[1]), help="chain_sum generator options of the "
                             "--easy-problems documents (default: two one-digit terms)")
    document_mask: bool = option(False, help="each packed document attends only to itself, its positions "
                                 "restarting at 0 as at inference (V3 packs without a mask)")
    resume: bool = option(False, help="continue the run in --out from its latest checkpoint (a larger --steps "
                          "extends it)")
    force: bool = option(False, help="replace an earlier run in --out instead of refusing")
    compile: bool = option(False, help="torch.compile the model")
    ep: int = option(1, help="expert parallelism over this many ranks (a divisor of the torchrun world size; the "
                     "rest is data parallel)", min=1)
    dist_timeout: float = option(600.0, help="seconds a collective may wait for the other ranks before the run "
                                 "stops with an error", above=0)
    fp8: bool = option(False, help="train the projections and experts in FP8 (V3's fine-grained recipe)")
    fp8_recipe: str = option("blockwise", help="blockwise (1×128 / 128×128 scales) or tensorwise", choices=RECIPES)
    optim_moments: str = option("fp32", help="AdamW moments in fp32 or bf16 (V3)", choices=("fp32", "bf16"))
    max_bad_steps: int = option(5, help="stop after this many non-finite steps in a row", min=1)
    index_warmup: float = option(0.1, help="V3.2: fraction of the run with dense attention while the indexer warms "
                                 "up", min=0, max=1)
    index_kl: float = option(1.0, help="V3.2: weight of the indexer's KL loss (it trains only the indexer)", min=0)
    model_overrides: dict = option(default_factory=dict, help="ModelConfig fields to override (JSON)")
    tensorboard: str = option("", help=TENSORBOARD_HELP, metavar="DIR")

    def __post_init__(self):
        check(self)
        check_tensorboard(self.tensorboard)
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch {self.micro_batch}")
        if self.resume and self.force:
            raise ValueError("--resume continues the run in --out and --force replaces it: give one of them")

    @classmethod
    def resume_of(cls, out: str, **changes) -> "PretrainConfig":
        """The configuration that continues the run in `out` (with `changes`, e.g. steps=600 to extend it)."""
        return resumed_config({"out": str(out), **changes})

    @classmethod
    def from_cli(cls, given: dict) -> "PretrainConfig":
        """The flags given on the command line; with --resume, the stored run's settings plus those flags."""
        if not given.get("resume"):
            return cls(**given)
        return resumed_config(given)


# Fields that may differ between a run and its resumption without changing the computation. Those of INVOCATION
# describe this launch (flags and process layout) and are never inherited from the stored run; the rest are
# inherited unless given again (the thread count too: fp32 sums over 1 or 2 threads differ in the last bit, so an
# exact continuation needs the same count).
INVOCATION = {"resume", "force", "ep", "dist_timeout"}
RESUME_FREE = INVOCATION | {"threads", "device", "compile", "eval_every", "eval_batches", "save_every", "keep",
                             "tensorboard"}


class NonFiniteError(StageError):
    """Too many consecutive non-finite losses or gradients."""


def run(cfg: PretrainConfig) -> Path:
    """Train (or resume) and return the final checkpoint directory."""
    out = Path(cfg.out)
    info = ddp.setup(pick_device(cfg.device), cfg.ep, cfg.dist_timeout)
    with ddp.guard(info) as where:  # a failed or timed-out collective ends the run with one line
        return _run(cfg, out, info, where)


def _run(cfg: PretrainConfig, out: Path, info: "ddp.DistInfo", where: "ddp.Where") -> Path:
    device = info.device
    _check_run(cfg, out, info.main)
    ddp.barrier(info)  # every rank checks OUT before rank 0 writes into it
    set_threads(cfg.threads)
    rt = _runtime(cfg, device, info)
    cfg = dataclasses.replace(cfg, precision=rt.precision)  # run.json records the choice; --resume keeps it
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_json(out, "pretrain", dataclasses.asdict(cfg))
        (out / "runtime.json").write_text(json.dumps(rt.describe(), indent=2) + "\n")
        tokenizer, train_tokens, heldout_tokens = prepare_data(cfg, out)
    ddp.barrier(info)
    if not info.main:  # the data is built once, by rank 0
        tokenizer, train_tokens, heldout_tokens = prepare_data(cfg, out)
    mcfg = get_preset(cfg.preset, **cfg.model_overrides)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    mcfg = mcfg.replace(vocab_size=tokenizer.vocab_size, max_seq_len=max(mcfg.max_seq_len, seq_len))
    ddp.check_layout(mcfg, info, cfg.batch_size, cfg.micro_batch)
    loader = PackedLoader(train_tokens, seq_len, seed=cfg.seed)
    loader.check_batch(max(cfg.batch_size, cfg.batch_start))
    # held-out batches of --batch-size rows whatever the layout: the same tokens are scored by one process or
    # many, with or without micro-batches (each rank scores its slice in micro-batch chunks)
    heldout = fixed_batches(heldout_tokens, seq_len, cfg.batch_size, cfg.eval_batches)

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)  # identical on every rank: same seed
    if cfg.fp8:
        convert_to_fp8(model, cfg.fp8_recipe)
    model = ddp.parallelize(model, info, rt.dtype)  # several processes: FSDP casts the weights for bf16
    optimizer = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, moments=cfg.optim_moments)
    log = MetricsLog(out / "metrics.jsonl", cfg.tensorboard) if info.main else None
    state = {"step": 0, "tokens": 0, "bad_steps": 0}
    if cfg.resume:
        state = _restore(out, model, optimizer, loader, log, info)
    forward = prepare_for_training(model, rt)  # bf16: compute copies of the fp32 master weights
    forward = torch.compile(forward) if cfg.compile else forward
    trainer = _Trainer(cfg, model, forward, optimizer, device, seq_len, info, peak_dtype=rt.dtype,
                       eos_id=tokenizer.eos_id if cfg.document_mask else None)
    tok_file = out / "data" / "tokenizer.json"

    bar = tqdm(total=cfg.steps, initial=state["step"], desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not info.main)
    where.cleanup.append(bar.close)  # the error line comes after the bar's, not inside it
    last = None
    with StopRequest(enabled=not info.enabled) as stop:  # Ctrl-C stops at the next step boundary
        while state["step"] < cfg.steps:
            if stop.requested:  # Ctrl-C: the last finished step is saved, then the command ends with status 130
                path = _save(out, model, optimizer, loader, state, tok_file, cfg, info, rt)
                bar.close()
                raise Interrupted(f"interrupted after step {state['step']}; saved {path} (continue with --resume)")
            step = state["step"]
            where.phase = f"at step {step + 1}"
            n_seq = batch_size_at(step, cfg.steps, cfg.batch_size, cfg.batch_start, cfg.batch_ramp)
            batch = loader.next(n_seq)  # the global batch, identical on every rank; each trains on its slice
            rows = n_seq // info.world
            metrics = trainer.step(batch[info.chunk * rows:(info.chunk + 1) * rows].to(device), step)
            state["bad_steps"] = 0 if metrics["finite"] else state["bad_steps"] + 1
            if state["bad_steps"] >= cfg.max_bad_steps:
                raise NonFiniteError(f"{cfg.max_bad_steps} non-finite steps in a row (last at step {step}); "
                                     "stopping without writing a checkpoint")
            state["step"], state["tokens"] = step + 1, state["tokens"] + n_seq * seq_len
            record = {"step": step + 1, "tokens": state["tokens"], "batch_size": n_seq,
                      **{k: v for k, v in metrics.items() if k != "finite"}}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                record.update(trainer.evaluate(heldout, step))
            if log is not None:
                log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                where.phase = f"saving the checkpoint of step {step + 1}"
                last = _save(out, model, optimizer, loader, state, tok_file, cfg, info, rt)
    bar.close()
    return last or ckpt.resolve(out)


def _runtime(cfg: PretrainConfig, device: torch.device, info: "ddp.DistInfo"):
    """The precision of this run. With several processes every rank must compute alike: rank 0's choice (and its
    reason) is the one every rank uses, even where ranks run on different kinds of host."""
    rt = resolve(str(device), cfg.precision, training=True) if info.main else None
    if info.enabled:  # the choice and its reason travel; each rank keeps its own device
        precision, reason = ddp.broadcast_object((rt.precision, rt.reason) if rt else None, info)
        rt = Runtime(device, precision, reason, cfg.precision)
    return rt


# ----------------------------------------------------------------------------- one step


class _Trainer:
    """The computation of one optimiser step and of one held-out evaluation."""

    def __init__(self, cfg: PretrainConfig, model: Transformer, forward, optimizer, device, seq_len: int,
                 info: "ddp.DistInfo", peak_dtype: torch.dtype = torch.float32, eos_id: int | None = None):
        self.cfg, self.model, self.forward, self.opt, self.device = cfg, model, forward, optimizer, device
        self.eos_id = eos_id  # set: documents are masked from each other (--document-mask)
        self.info = info
        self.gates = [m for m in model.modules() if isinstance(m, Gate)]
        # main layers with a learned router, in router-log order (V4's hash-routed layers have none)
        self.gate_layers = [i for i, layer in enumerate(model.layers) if any(isinstance(m, Gate) for m in layer.modules())]
        self.n_main_moe = len(self.gate_layers)
        self.sparse = model.cfg.family_traits.indexer_kl  # V3.2: the indexer trains on its KL (IndexerLog)
        self.flops_per_token = train_flops_per_token(model.cfg, seq_len, include_mtp=True)
        # MFU against the peak of the compute precision (fp32's where bf16 is emulated: runtime.peak_dtype)
        self.peak = matmul_peak(device, dtype=peak_dtype)

    def _router_log(self, step: int) -> RouterLog:
        """V3.2 also collects the indexer's KL, with dense attention during the warm-up (V3.2 report §2.1.1)."""
        if not self.sparse:
            return RouterLog()
        return IndexerLog(dense=step < self.cfg.index_warmup * self.cfg.steps)

    def _packing(self, x: torch.Tensor) -> dict:
        """With --document-mask, the segments (B, T) and per-document positions (B, T) of the packed inputs: a
        document ends with eos, so the token after an eos starts the next one."""
        if self.eos_id is None:
            return {}
        return document_segments(x, self.eos_id)

    def _losses(self, batch: torch.Tensor, step: int):
        cfg = self.cfg
        x, y = batch[:, :-1], batch[:, 1:]
        router_log = self._router_log(step)
        loss, mtp_losses = lm_loss(self.forward, x, y, router_log, **self._packing(x))
        lam = mtp_lambda_at(step, cfg.steps, cfg.mtp_lambda, cfg.mtp_lambda_final, cfg.mtp_switch)
        mtp = torch.stack(mtp_losses).mean() if mtp_losses else None
        alpha = {"aux-free": cfg.seq_balance_alpha, "aux-loss": cfg.aux_loss_alpha}.get(cfg.balance, 0.0)
        bal = None
        if router_log and alpha > 0:
            bal = sum(balance_loss(s, i, n_seq=x.shape[0], per_sequence=cfg.balance == "aux-free")
                      for s, i in router_log)
        total = loss + (lam * mtp if mtp is not None else 0) + (alpha * bal if bal is not None else 0)
        if isinstance(router_log, IndexerLog) and router_log.indexer_losses:
            total = total + cfg.index_kl * torch.stack(router_log.indexer_losses).mean()
        return total, loss, mtp, bal, lam, router_log

    def step(self, batch: torch.Tensor, step: int) -> dict:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.decay_start, cfg.decay_end, cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        micro = cfg.micro_batch or batch.shape[0]
        chunks = batch.split(micro)
        sums = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0, "indexer_kl": 0.0 if self.sparse else math.nan}
        loads = [torch.zeros_like(g.bias) for g in self.gates]
        for chunk in chunks:
            total, loss, mtp, bal, lam, router_log = self._losses(chunk, step)
            # each micro-batch's mean at weight 1 (a short last one at its share), the sum divided after backward:
            # FP8's tile scales are clamped, so its gradients are not proportional to a loss scale set before it
            (total if chunk.shape[0] == micro else total * (chunk.shape[0] / micro)).backward()
            w = chunk.shape[0] / batch.shape[0]
            sums["loss"] += loss.item() * w
            sums["mtp_loss"] += mtp.item() * w if mtp is not None else math.nan
            sums["balance_loss"] += bal.item() * w if bal is not None else math.nan
            if isinstance(router_log, IndexerLog):
                sums["indexer_kl"] += torch.stack(router_log.indexer_losses).mean().item() * w
            for i, (_, idx) in enumerate(router_log):
                loads[i] += expert_loads(idx, loads[i].numel())
        if self.info.enabled:  # global loss, expert loads and gradients: every rank takes the same decisions
            ddp.finish_grads(model, self.info)
            totals = torch.tensor([sums[k] for k in ("loss", "mtp_loss", "balance_loss")], dtype=torch.float64)
            ddp.all_reduce_(list(loads) + [totals], self.info)
            sums.update(zip(("loss", "mtp_loss", "balance_loss"), (totals / self.info.world).tolist()))
        if batch.shape[0] != micro:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(batch.shape[0] / micro)
        grad_norm = ddp.grad_norm_and_clip(model, cfg.grad_clip, self.info)  # one process too: the same clipping
        finite = math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.opt.step()
            if cfg.balance == "aux-free" and step / cfg.steps < cfg.bias_update_stop:
                update_routing_bias([g.bias for g in self.gates], loads, cfg.bias_update_speed)
        else:
            warnings.warn(f"step {step + 1}: non-finite loss or gradient norm ({sums['loss']}, {grad_norm}); "
                          "step skipped", stacklevel=2)
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tps = batch.shape[0] * self.info.world * (batch.shape[1] - 1) / dt
        out = {"loss": sums["loss"], "lr": lr, "grad_norm": grad_norm, "mtp_lambda": lam, "tokens_per_s": tps,
               "mfu": tps * self.flops_per_token / self.peak, "finite": finite}
        out.update({k: v for k, v in sums.items() if k != "loss" and not math.isnan(v)})
        out.update(self._balance_metrics(loads))
        return out

    def _balance_metrics(self, loads: list[torch.Tensor]) -> dict:
        if not loads:
            return {}
        vio = [max_violation(load) for load in loads]
        main = vio[: self.n_main_moe]
        record = {"maxvio": sum(main) / len(main)} if main else {}
        record.update({f"maxvio_layer{layer}": v for layer, v in zip(self.gate_layers, main)})
        record.update({f"maxvio_mtp{k}": v for k, v in enumerate(vio[self.n_main_moe:])})
        return record

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor], step: int = 0) -> dict:
        """Held-out next-token and MTP loss, and the global MaxVio over every held-out token (at `step`'s
        attention mode: V3.2 evaluates dense during its warm-up)."""
        if not batches:
            return {}
        self.model.eval()
        ce = mtp = 0.0
        loads = [torch.zeros_like(g.bias) for g in self.gates]
        for batch in batches:
            rows = batch.shape[0] // self.info.world
            batch = batch[self.info.chunk * rows:(self.info.chunk + 1) * rows].to(self.device)
            chunks = batch.split(self.cfg.micro_batch or rows)
            for chunk in chunks:  # equal-sized chunks (check_layout), so the mean of their means is the mean
                router_log = self._router_log(step)
                loss, mtp_losses = lm_loss(self.forward, chunk[:, :-1], chunk[:, 1:], router_log,
                                           **self._packing(chunk[:, :-1]))
                weight = len(batches) * len(chunks)
                ce += loss.item() / weight
                mtp += torch.stack(mtp_losses).mean().item() / weight if mtp_losses else 0.0
                for i, (_, idx) in enumerate(router_log):
                    loads[i] += expert_loads(idx, loads[i].numel())
        self.model.train()
        totals = torch.tensor([ce, mtp], dtype=torch.float64)
        ddp.all_reduce_(loads + [totals], self.info)
        ce, mtp = (totals / self.info.world).tolist()
        record = {"heldout_loss": ce}
        if self.model.cfg.n_mtp_layers:
            record["heldout_mtp_loss"] = mtp
        main = [max_violation(load) for load in loads[: self.n_main_moe]]
        if main:
            record["heldout_maxvio"] = sum(main) / len(main)
        return record


# ----------------------------------------------------------------------------- checkpoints


def _save(out: Path, model, optimizer, loader, state: dict, tok_file: Path, cfg: PretrainConfig, info, rt) -> Path:
    """Atomic checkpoint. One process: torch.save of the optimizer; several: DCP shards from every rank."""
    path = out / "checkpoints" / f"step_{state['step']:06d}"
    meta = {"step": state["step"], "tokens": state["tokens"], "stage": "pretrain", "run": dataclasses.asdict(cfg),
            "world_size": info.world, **rt.checkpoint_meta()}
    extra = {"loader": loader.state_dict(), "rng": torch.get_rng_state(), **state}
    if not info.enabled:
        with ckpt.atomic_dir(path) as tmp:
            (tmp / "train_state").mkdir()
            torch.save({"optimizer": optimizer.state_dict(), **extra}, tmp / "train_state" / "state.pt")
            ckpt.write_model_files(model, tmp, tok_file, meta=meta)
    else:
        tmp = path.with_name(f".{path.name}.tmp-dist")
        if info.main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "train_state").mkdir(parents=True)
        ddp.barrier(info)
        ddp.save_dcp(tmp / "train_state" / "dcp", model, optimizer, info)
        full = ddp.full_model_state(model, info)
        ddp.barrier(info)
        if info.main:
            torch.save(extra, tmp / "train_state" / "state.pt")
            ckpt.write_model_files(model, tmp, tok_file, meta=meta, state=full)
            ckpt.replace_dir(tmp, path)
        ddp.barrier(info)
    if info.main:
        for old in ckpt.step_dirs(out)[: -cfg.keep] if cfg.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _restore(out: Path, model, optimizer, loader, log: "MetricsLog | None", info) -> dict:
    steps = ckpt.step_dirs(out)
    if not steps:
        raise ValueError(f"--resume: {out} has no checkpoints to resume from")
    path = steps[-1]
    ckpt.verify(path)
    saved = torch.load(path / "train_state" / "state.pt", weights_only=False)
    if (path / "train_state" / "dcp").exists():  # written by several processes: DCP reshards to this world
        ddp.load_dcp(path / "train_state" / "dcp", model, optimizer, info)
    elif info.enabled:
        raise ValueError(f"{path} was written by a single process; resume it with one process")
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path / "model.safetensors")))
        optimizer.load_state_dict(saved["optimizer"])
    loader.load_state_dict(saved["loader"])
    torch.set_rng_state(saved["rng"])
    if log is not None:
        log.truncate_after(saved["step"])
    if info.main:
        print(f"resumed from {path} (step {saved['step']})", file=sys.stderr)
    return {k: saved[k] for k in ("step", "tokens", "bad_steps")}


def _read_run(out: Path) -> dict:
    return read_run(PretrainConfig, "pretrain", out, unnamed="pretrain")  # runs before "command" was recorded


def resumed_config(given: dict) -> PretrainConfig:
    """--resume: the stored run's settings, then the flags given (stages/resume.py); a larger --steps extends the
    run (the schedule is recomputed for the new length)."""
    return resume.resumed_config(PretrainConfig, "pretrain", given, extendable=("steps",), free=RESUME_FREE,
                                 invocation=INVOCATION, unnamed="pretrain")


def _check_run(cfg: PretrainConfig, out: Path, main: bool = True) -> None:
    """Everything that can be wrong with the run's settings or its OUT, found before any work starts."""
    mcfg = get_preset(cfg.preset, **cfg.model_overrides)  # ValueError naming a bad override
    if cfg.document_mask and (not mcfg.family_traits.document_segments or mcfg.n_mtp_layers):
        raise ValueError(f"--document-mask: only for V3-family models without MTP layers ({cfg.preset} has "
                         f"{mcfg.n_mtp_layers} MTP layers, family {mcfg.family}: the MTP modules and the sparse "
                         "attentions of V3.2/V4 take no document segments)")
    if not cfg.tokenizer and (cfg.vocab_size or mcfg.vocab_size) < MIN_VOCAB:
        raise ValueError(f"--vocab-size {cfg.vocab_size or mcfg.vocab_size}: a byte-level BPE tokenizer needs at "
                         f"least {MIN_VOCAB} entries (pass --vocab-size {MIN_VOCAB} or more)")
    if cfg.tokenizer and not Path(cfg.tokenizer).exists():
        raise ValueError(f"--tokenizer {cfg.tokenizer}: no such file")
    if cfg.resume:
        steps = ckpt.step_dirs(out)
        if not steps:
            raise ValueError(f"--resume: {out} has no checkpoint to resume from (pass --force to start it over)")
        saved, done = _read_run(out), int(steps[-1].name.split("_")[1])
        for name, value in dataclasses.asdict(cfg).items():
            if name not in RESUME_FREE | {"out", "steps"} and name in saved and saved[name] != value:
                raise ValueError(f"--resume: --{name.replace('_', '-')} {value} differs from the run being "
                                 f"resumed ({saved[name]})")
        if cfg.steps < done:
            raise ValueError(f"--resume: --steps {cfg.steps} is fewer than the {done} steps already done")
        return
    check_out_dir(out, "--out", own=own_run(out, "pretrain"), force=cfg.force)
    if cfg.force and main:
        clear_run(out)
