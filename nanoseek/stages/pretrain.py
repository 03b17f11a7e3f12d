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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..config import get_preset
from .. import dist as ddp
from ..data import PackedLoader, fixed_batches
from ..fp8 import RECIPES, convert_to_fp8
from ..losses import balance_loss, lm_loss
from ..model import Gate, RouterLog, Transformer
from ..sparse import IndexerLog
from ..optim import (batch_size_at, build_optimizer, expert_loads, lr_at, max_violation, mtp_lambda_at,
                     update_routing_bias)
from ..runtime import autocast, matmul_peak, pick_device, set_threads
from ..stats import train_flops_per_token
from .common import MetricsLog, prepare_data


@dataclass
class PretrainConfig:
    out: str = field(metadata={"help": "run directory (checkpoints, metrics.jsonl, data cache)"})
    preset: str = field(default="small", metadata={"help": "model preset"})
    data: list[str] = field(default_factory=list, metadata={"help": "text/JSONL/Parquet files or globs (default: the embedded corpus)"})
    tokenizer: str = field(default="", metadata={"help": "use this tokenizer.json instead of training one"})
    vocab_size: int = field(default=0, metadata={"help": "tokenizer vocabulary to train (0: the preset's)"})
    seq_len: int = field(default=0, metadata={"help": "training sequence length (0: the preset's max_seq_len)"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "sequences per optimizer step"})
    micro_batch: int = field(default=0, metadata={"help": "sequences per forward pass (gradient accumulation); 0: batch_size"})
    batch_start: int = field(default=0, metadata={"help": "batch-size ramp: sequences per step at the start (0: no ramp)"})
    batch_ramp: float = field(default=0.0, metadata={"help": "batch-size ramp: fraction of the run to reach --batch-size"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr (V3: 0.1)"})
    warmup: float = field(default=0.02, metadata={"help": "fraction of steps in linear warm-up"})
    decay_start: float = field(default=0.676, metadata={"help": "fraction where cosine decay starts (V3: 10T/14.8T)"})
    decay_end: float = field(default=0.966, metadata={"help": "fraction where the constant tail starts (V3: 14.3T/14.8T)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    mtp_lambda: float = field(default=0.3, metadata={"help": "MTP loss weight λ (V3: 0.3)"})
    mtp_lambda_final: float = field(default=0.1, metadata={"help": "λ after --mtp-switch (V3: 0.1)"})
    mtp_switch: float = field(default=0.676, metadata={"help": "fraction of the run where λ changes"})
    balance: str = field(default="aux-free", metadata={"help": "aux-free (V3: bias update + sequence-wise loss), aux-loss (batch-level auxiliary loss only) or none"})
    bias_update_speed: float = field(default=0.001, metadata={"help": "γ of the bias update (V3: 0.001)"})
    bias_update_stop: float = field(default=0.966, metadata={"help": "fraction of the run after which γ = 0"})
    seq_balance_alpha: float = field(default=1e-4, metadata={"help": "α of V3's sequence-wise balance loss (aux-free mode)"})
    aux_loss_alpha: float = field(default=0.01, metadata={"help": "α of the batch-level auxiliary loss (aux-loss mode)"})
    eval_every: int = field(default=50, metadata={"help": "held-out loss every N steps (0: only at the end)"})
    eval_batches: int = field(default=8, metadata={"help": "held-out batches per evaluation"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep: int = field(default=2, metadata={"help": "checkpoints to keep"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation and data order"})
    data_seed: int = field(default=0, metadata={"help": "seed of the embedded corpus"})
    n_problems: int = field(default=6000, metadata={"help": "reasoning documents in the embedded corpus"})
    easy_problems: int = field(default=0, metadata={"help": "extra one-digit chain_sum problems in the embedded corpus"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its latest checkpoint"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    ep: int = field(default=1, metadata={"help": "expert parallelism over this many ranks (1 or the torchrun world size)"})
    fp8: bool = field(default=False, metadata={"help": "train the projections and experts in FP8 (V3's fine-grained recipe)"})
    fp8_recipe: str = field(default="blockwise", metadata={"help": "blockwise (1×128 / 128×128 scales) or tensorwise"})
    optim_moments: str = field(default="fp32", metadata={"help": "AdamW moments in fp32 or bf16 (V3)"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many non-finite steps in a row"})
    index_warmup: float = field(default=0.1, metadata={"help": "V3.2: fraction of the run with dense attention while the indexer warms up"})
    index_kl: float = field(default=1.0, metadata={"help": "V3.2: weight of the indexer's KL loss (it trains only the indexer)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0: all)"})
    model_overrides: dict = field(default_factory=dict, metadata={"help": "ModelConfig fields to override (JSON)"})


# Fields that may differ between a run and its resumption without changing the computation.
RESUME_FREE = {"resume", "threads", "device", "compile", "eval_every", "eval_batches", "save_every", "keep", "ep"}


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


def run(cfg: PretrainConfig) -> Path:
    """Train (or resume) and return the final checkpoint directory."""
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    info = ddp.setup(device, cfg.ep)
    cfg = _reconcile_resume(cfg, out, info)
    _validate(cfg)
    set_threads(cfg.threads)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
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
    eval_batch = (cfg.micro_batch or cfg.batch_size // info.world) * info.world
    heldout = fixed_batches(heldout_tokens, seq_len, eval_batch, cfg.eval_batches)

    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).to(device)  # identical on every rank: same seed
    if cfg.fp8:
        convert_to_fp8(model, cfg.fp8_recipe)
    model = ddp.parallelize(model, info)
    optimizer = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, moments=cfg.optim_moments)
    log = MetricsLog(out / "metrics.jsonl") if info.main else None
    state = {"step": 0, "tokens": 0, "bad_steps": 0}
    if cfg.resume:
        state = _restore(out, model, optimizer, loader, log, info)
    forward = torch.compile(model) if cfg.compile else model
    trainer = _Trainer(cfg, model, forward, optimizer, device, seq_len, info)
    tok_file = out / "data" / "tokenizer.json"

    bar = tqdm(total=cfg.steps, initial=state["step"], desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not info.main)
    last = None
    while state["step"] < cfg.steps:
        step = state["step"]
        n_seq = batch_size_at(step, cfg.steps, cfg.batch_size, cfg.batch_start, cfg.batch_ramp)
        batch = loader.next(n_seq)  # the global batch, identical on every rank; each trains on its slice
        rows = n_seq // info.world
        metrics = trainer.step(batch[info.rank * rows:(info.rank + 1) * rows].to(device), step)
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
            last = _save(out, model, optimizer, loader, state, tok_file, cfg, info)
    bar.close()
    return last or ckpt.resolve(out)


# ----------------------------------------------------------------------------- one step


class _Trainer:
    """The computation of one optimiser step and of one held-out evaluation."""

    def __init__(self, cfg: PretrainConfig, model: Transformer, forward, optimizer, device, seq_len: int,
                 info: "ddp.DistInfo"):
        self.cfg, self.model, self.forward, self.opt, self.device = cfg, model, forward, optimizer, device
        self.info = info
        self.gates = [m for m in model.modules() if isinstance(m, Gate)]
        # main layers with a learned router, in router-log order (V4's hash-routed layers have none)
        self.gate_layers = [i for i, layer in enumerate(model.layers) if any(isinstance(m, Gate) for m in layer.modules())]
        self.n_main_moe = len(self.gate_layers)
        self.sparse = model.cfg.family == "v32"
        self.flops_per_token = train_flops_per_token(model.cfg, seq_len, include_mtp=True)
        self.peak = matmul_peak(device)

    def _router_log(self, step: int) -> RouterLog:
        """V3.2 also collects the indexer's KL, with dense attention during the warm-up (V3.2 report §2.1.1)."""
        if not self.sparse:
            return RouterLog()
        return IndexerLog(dense=step < self.cfg.index_warmup * self.cfg.steps)

    def _losses(self, batch: torch.Tensor, step: int):
        cfg = self.cfg
        x, y = batch[:, :-1], batch[:, 1:]
        router_log = self._router_log(step)
        with autocast(self.device):
            loss, mtp_losses = lm_loss(self.forward, x, y, router_log)
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
            (total * chunk.shape[0] / batch.shape[0]).backward()
            w = chunk.shape[0] / batch.shape[0]
            sums["loss"] += loss.item() * w
            sums["mtp_loss"] += mtp.item() * w if mtp is not None else math.nan
            sums["balance_loss"] += bal.item() * w if bal is not None else math.nan
            if isinstance(router_log, IndexerLog):
                sums["indexer_kl"] += torch.stack(router_log.indexer_losses).mean().item() * w
            for i, (_, idx) in enumerate(router_log):
                loads[i] += expert_loads(idx, loads[i].numel())
        if self.info.enabled:  # global loss, norm and expert loads: every rank takes the same decisions
            ddp.finish_grads(model, self.info)
            grad_norm = ddp.grad_norm_and_clip(model, cfg.grad_clip, self.info)
            totals = torch.tensor([sums[k] for k in ("loss", "mtp_loss", "balance_loss")], dtype=torch.float64)
            ddp.all_reduce_(list(loads) + [totals], self.info)
            sums.update(zip(("loss", "mtp_loss", "balance_loss"), (totals / self.info.world).tolist()))
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
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
            batch = batch[self.info.rank * rows:(self.info.rank + 1) * rows].to(self.device)
            router_log = self._router_log(step)
            with autocast(self.device):
                loss, mtp_losses = lm_loss(self.model, batch[:, :-1], batch[:, 1:], router_log)
            ce += loss.item() / len(batches)
            mtp += torch.stack(mtp_losses).mean().item() / len(batches) if mtp_losses else 0.0
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


def _save(out: Path, model, optimizer, loader, state: dict, tok_file: Path, cfg: PretrainConfig, info) -> Path:
    """Atomic checkpoint. One process: torch.save of the optimizer; several: DCP shards from every rank."""
    path = out / "checkpoints" / f"step_{state['step']:06d}"
    meta = {"step": state["step"], "tokens": state["tokens"], "stage": "pretrain", "run": dataclasses.asdict(cfg),
            "world_size": info.world}
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


def _reconcile_resume(cfg: PretrainConfig, out: Path, info=None) -> PretrainConfig:
    """On --resume the saved run configuration rules; a conflicting explicit setting is an error."""
    saved_file = out / "run.json"
    if not cfg.resume:
        if ckpt.step_dirs(out):
            raise ValueError(f"{out} already holds checkpoints; pass --resume to continue it or choose another --out")
        return cfg
    if not saved_file.exists():
        raise ValueError(f"--resume: {out} is not a pretraining run (no run.json)")
    saved = json.loads(saved_file.read_text())
    defaults = PretrainConfig(out=cfg.out)
    for f in dataclasses.fields(PretrainConfig):
        mine = getattr(cfg, f.name)
        if f.name in RESUME_FREE or f.name == "out":
            continue
        if mine != getattr(defaults, f.name) and mine != saved.get(f.name):
            raise ValueError(f"--resume: --{f.name.replace('_', '-')} {mine} differs from the run being resumed "
                             f"({saved.get(f.name)})")
    # free settings: an explicit new value wins, otherwise the run keeps its own
    free = {k: getattr(cfg, k) for k in RESUME_FREE if getattr(cfg, k) != getattr(defaults, k)}
    return PretrainConfig(**{**saved, **free, "resume": True, "out": cfg.out})


def _validate(cfg: PretrainConfig) -> None:
    if cfg.balance not in ("aux-free", "aux-loss", "none"):
        raise ValueError(f"--balance must be aux-free, aux-loss or none, got {cfg.balance!r}")
    if cfg.steps <= 0 or cfg.batch_size <= 0:
        raise ValueError("--steps and --batch-size must be positive")
    if cfg.micro_batch and cfg.batch_size % cfg.micro_batch:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {cfg.micro_batch}")
    if cfg.save_every <= 0:
        raise ValueError("--save-every must be positive")
    if cfg.fp8_recipe not in RECIPES:
        raise ValueError(f"--fp8-recipe must be one of {', '.join(RECIPES)}, got {cfg.fp8_recipe!r}")
    if not 0 <= cfg.index_warmup <= 1 or cfg.index_kl < 0:
        raise ValueError("--index-warmup must be a fraction in [0, 1] and --index-kl >= 0")
    if cfg.optim_moments not in ("fp32", "bf16"):
        raise ValueError(f"--optim-moments must be fp32 or bf16, got {cfg.optim_moments!r}")
