"""Scale-out with torch.distributed: process groups from torchrun, FSDP2 data parallelism, expert parallelism over
a DP × EP mesh, collective timeouts that end a run with one line, and DCP checkpoints that reshard on resume.

- Data parallelism: every Block and the root are `fully_shard`ed (FSDP2, ZeRO-3 style) over all ranks; each rank
  trains on its slice of the global batch and FSDP averages the gradients, so a step equals one process.
- Expert parallelism (`--ep N`, N dividing the world size W): ranks form a (W/N) × N mesh; each row of N ranks
  (an EP group, contiguous ranks, i.e. one node on a GPU cluster) splits every MoE layer's routed experts in
  contiguous blocks (DeepSeek-V3 report §3.2: EP64 across 8 nodes), and the W/N rows are data-parallel replicas
  of the experts. Tokens travel to their experts and back by all-to-all inside the EP group; the experts'
  own `Experts.ffn` (and its `matmul` hook, hence FP8) runs on the received rows.
- Collective order (why a run cannot deadlock in backward): FSDP's backward collectives fire from hooks on
  block outputs (all-gather) and inputs (reduce-scatter), the expert all-to-alls sit inside the block between
  them, and every block's gradient depends on the next one's, so the order is fixed by data dependence, not by
  the autograd engine's choice among ready nodes. What it needs is that every rank's backward graph has the
  same collectives whatever the routing: dispatch and combine are one autograd Function each that is recorded
  (and so runs its backward all-to-all) even when a rank receives no token slot, and the owner runs one branch
  per source rank, empty or not. Expert weights are kept out of FSDP (ignored parameters); their gradients are
  summed source by source (with DP replicas: gathered over them in each source's branch). Expert traffic has
  its own process groups, so it can never be matched against an FSDP collective; host-side waits (rank 0 alone
  building data or writing files) use a gloo group with a long timeout.
- Bit-identical to one process on CPU (same losses, loads and parameters as one process training on the same
  batch chunks as micro-batches): gradients of the chunks are added in chunk order everywhere. In bf16 mixed
  precision too: FSDP2 makes the bf16 compute copies that runtime.MixedPrecision makes in one process.
- Failures: every collective has a timeout (`--dist-timeout`); a timed-out, mismatched or broken collective
  (a dead peer) raises CollectiveError with one line naming the rank and the collective. On NCCL, blocking
  wait (TORCH_NCCL_BLOCKING_WAIT=1) makes the timeout raise in Python instead of aborting the process.
- Checkpoints: DCP writes each rank's shards (experts as DTensors: replicated over DP, sharded over EP);
  loading at another world size or layout, one process included, reshards. Rank 0 also writes the full
  model.safetensors, so `generate`, `eval` and `export` work on a distributed run's checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import StageError
from .model import Experts, Transformer
from .runtime import fp32_params, keeps_fp32

HOST_WAIT_S = 3600.0  # timeout of waits for rank 0 alone (building the data, writing the full model)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    ep: int = 1
    timeout_s: float = 600.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None  # 1-D DeviceMesh over all ranks: FSDP
    expert_mesh: object = None  # 2-D (dp, ep) DeviceMesh: expert tensors in DCP checkpoints
    ep_group: object = None  # the ranks splitting the experts (expert all-to-all)
    dp_group: object = None  # the ranks holding the same experts (expert gradient all-reduce)
    host_group: object = None  # gloo, long timeout: barriers while rank 0 works alone, DCP coordination

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def chunk(self) -> int:
        """Which slice of the global batch this rank trains on: ep_rank·dp + dp_rank.

        Gradients are summed chunk by chunk in this order (FSDP shards over ranks, experts source by source across
        the DP replicas), the order in which one process adds the same chunks as micro-batches."""
        return self.ep_rank * self.dp + self.dp_rank

    def rank_of_chunk(self, c: int) -> int:
        return (c % self.dp) * self.ep + c // self.dp


def setup(device: torch.device, ep: int = 1, timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); a plain process gets world size 1.

    On CUDA each process takes the GPU of its LOCAL_RANK (info.device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be positive seconds, got {timeout_s}")
    if world == 1:
        if ep > 1:
            raise ValueError(f"--ep {ep} needs {ep} processes: launch with torchrun --nproc_per_node={ep}")
        return DistInfo(device=device, timeout_s=timeout_s)
    if ep < 1 or world % ep:
        raise ValueError(f"--ep must divide the world size {world}; got {ep}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a timeout raises here instead of aborting
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    info = DistInfo(rank=dist.get_rank(), world=world, ep=ep, timeout_s=timeout_s, device=device,
                    mesh=init_device_mesh(device.type, (world,)))
    # every rank creates every group, in the same order (new_group is itself a collective)
    info.host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(HOST_WAIT_S, timeout_s)))
    if ep > 1:
        dp = world // ep
        rows = [list(range(d * ep, (d + 1) * ep)) for d in range(dp)]
        cols = [list(range(e, world, ep)) for e in range(ep)]
        ep_groups = [dist.new_group(r, timeout=timeout) for r in rows]
        dp_groups = [dist.new_group(c, timeout=timeout) for c in cols]
        info.ep_group, info.dp_group = ep_groups[info.dp_rank], dp_groups[info.ep_rank]
        info.expert_mesh = DeviceMesh.from_group([info.dp_group, info.ep_group], device.type,
                                                 mesh=torch.arange(world).view(dp, ep), mesh_dim_names=("dp", "ep"))
    return info


def check_layout(cfg, info: DistInfo, batch_size: int, micro_batch: int) -> None:
    """One clear error for an impossible layout."""
    if batch_size % info.world:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the world size {info.world}")
    if micro_batch and (batch_size // info.world) % micro_batch:
        raise ValueError(f"per-rank batch {batch_size // info.world} must be a multiple of --micro-batch {micro_batch}")
    if info.ep > 1 and cfg.n_routed_experts % info.ep:
        raise ValueError(f"{cfg.n_routed_experts} routed experts cannot be split over --ep {info.ep} ranks")


# ----------------------------------------------------------------------------- failures


class CollectiveError(StageError):
    """A collective that timed out, failed or met a dead peer; the message is one line naming rank and collective."""


_NOTE = "nanoseek collective: "


def _checkpoint_exception() -> type:
    from torch.distributed.checkpoint import CheckpointException  # a BaseException: DCP's wrapper of rank failures

    return CheckpointException


@contextlib.contextmanager
def labelled(what: str):
    """Name the collectives issued inside (the name travels with an error raised from them, through autograd)."""
    try:
        yield
    except (RuntimeError, _checkpoint_exception()) as e:
        if not any(n.startswith(_NOTE) for n in getattr(e, "__notes__", ())):
            e.add_note(_NOTE + what)
        raise


# torch.distributed functions that identify which library issued a failed collective
_CONTEXTS = {"foreach_reduce": "FSDP gradient reduce-scatter", "foreach_all_gather": "FSDP parameter all-gather",
             "wait_for_unshard": "FSDP parameter all-gather", "save": "DCP checkpoint save",
             "load": "DCP checkpoint load"}


def describe_failure(e: BaseException, info: DistInfo, phase: str) -> str | None:
    """One line for an exception raised by a collective (None if it did not come from torch.distributed)."""
    frames = list(traceback.extract_tb(e.__traceback__))
    cause = e
    if isinstance(e, _checkpoint_exception()) and e.failures:  # {rank: (exception, stack)}: report the first
        cause, stack = next(iter(e.failures.values()))
        frames += list(stack)
    dist_frames = [f for f in frames if f"torch{os.sep}distributed{os.sep}" in f.filename]
    notes = [n[len(_NOTE):] for n in getattr(e, "__notes__", ()) if n.startswith(_NOTE)]
    if not dist_frames and not notes and not isinstance(e, dist.DistError):
        return None
    c10d = [f.name for f in dist_frames if f.filename.endswith("distributed_c10d.py")]
    name = c10d[-1] if c10d else (dist_frames[-1].name if dist_frames else type(e).__name__)
    context = notes[0] if notes else next((_CONTEXTS[f.name] for f in reversed(dist_frames) if f.name in _CONTEXTS),
                                          "")
    text = str(cause).strip()
    reason = text.splitlines()[0] if text else type(cause).__name__
    if reason.startswith("[") and "] " in reason:  # drop gloo's "[/path/to/file.cc:78] " prefix
        reason = reason.split("] ", 1)[1]
    what = f"{name} ({context})" if context else name
    return (f"rank {info.rank} of {info.world}: collective {what} failed {phase}: {reason} — a peer died, hung or "
            f"issued its collectives in another order (--dist-timeout {info.timeout_s:g} s)")


class Where:
    """The phase a guarded region is in, for the error line (updated by the caller as it goes), and what to close
    before the line is printed (a progress bar)."""

    def __init__(self, phase: str):
        self.phase = phase
        self.cleanup: list = []


@contextlib.contextmanager
def guard(info: DistInfo, phase: str = "during setup"):
    """Turn a failed collective inside into CollectiveError (one line); other errors pass unchanged."""
    where = Where(phase)
    try:
        yield where
    except (RuntimeError, _checkpoint_exception()) as e:
        if isinstance(e, CollectiveError) or not info.enabled:
            raise
        line = describe_failure(e, info, where.phase)
        if line is None:
            raise
        for close in where.cleanup:
            close()
        raise CollectiveError(line) from e


# ----------------------------------------------------------------------------- expert parallelism


class _AllToAll(torch.autograd.Function):
    """Rows x[in_splits[r] block] go to rank r; its backward sends the gradients back the same way.

    Recorded even for zero rows, so every rank of the group runs the backward all-to-all whatever the routing."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], dispatcher: "ExpertDispatch", what: str):
        ctx.splits, ctx.dispatcher, ctx.what = (out_splits, in_splits), dispatcher, what
        return dispatcher.exchange(x, out_splits, in_splits, f"{what}, forward")

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return ctx.dispatcher.exchange(grad, in_splits, out_splits, f"{ctx.what}, backward"), None, None, None, None


class _Tap(torch.autograd.Function):
    """The expert weights used for one source rank's rows, in the compute dtype (under bf16 mixed precision a
    bf16 copy of the fp32 weights, which FSDP does not manage here); the backward hands that source's weight
    gradients, in fp32, to the dispatcher's running sum instead of to autograd's accumulation."""

    @staticmethod
    def forward(ctx, dispatcher: "ExpertDispatch", dtype, w1, w2, w3):
        ctx.dispatcher = dispatcher
        return tuple(w.view_as(w) if w.dtype == dtype else w.to(dtype) for w in (w1, w2, w3))

    @staticmethod
    def backward(ctx, g1, g2, g3):
        ctx.dispatcher.add_grads(tuple(g.float() for g in (g1, g2, g3)))
        return None, None, None, None, None


class ExpertDispatch:
    """Expert parallelism for one MoE layer: this rank owns experts [ep_rank·El, (ep_rank+1)·El) of E.

    Called by Experts.forward with the token slots sorted by global expert (hence by owner rank): the slot counts
    are exchanged, the slots travel to their owners (dispatch), the owner runs the experts' `ffn` on each source
    rank's rows, and the outputs travel back (combine). `sent_bytes` counts what left this rank, both directions
    of forward and backward. The weight gradients are summed by `add_grads`, source by source, and handed to the
    parameters by `finish_grads`."""

    def __init__(self, name: str, n_experts: int, info: DistInfo):
        self.name, self.n_experts, self.ep_rank, self.ep, self.group = name, n_experts, info.ep_rank, info.ep, \
            info.ep_group
        self.dp, self.dp_group = info.dp, info.dp_group
        self.sent_bytes = 0
        self.grad_sum: torch.Tensor | None = None  # flat (w1, w2, w3) gradient sum of this step

    def add_grads(self, grads) -> None:
        """One source's weight gradients: with DP replicas, gather the same source index from each (batch chunks
        i·dp + d, d = 0..dp-1, consecutive) and add them in chunk order."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.dp > 1:
            gathered = flat.new_empty(self.dp * flat.numel())
            with labelled(f"expert gradient all-gather over the DP replicas, {self.name}"):
                dist.all_gather_single(gathered, flat, group=self.dp_group)
            gathered = gathered.view(self.dp, -1)
        else:
            gathered = flat[None]
        for g in gathered:
            self.grad_sum = g.clone() if self.grad_sum is None else self.grad_sum.add_(g)

    def exchange(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], what: str) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        with labelled(f"expert {what}, {self.name}"):
            dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group)
        self.sent_bytes += (x.shape[0] - in_splits[self.ep_rank]) * x[:1].numel() * x.element_size()
        return out

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor, experts: Experts) -> torch.Tensor:
        W, El = self.ep, self.n_experts // self.ep
        recv_counts = torch.empty_like(counts)  # recv_counts[s·El + j]: slots from rank s for my expert j
        with labelled(f"expert slot counts, {self.name}"):
            dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(W, El)
        send = counts.view(W, El).sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        got = _AllToAll.apply(xs, recv, send, self, "dispatch")  # (sum(recv), D): by source rank, then expert
        # One ffn per source rank, built last-to-first: autograd runs the most recently built branch first, so the
        # sources' weight gradients reach add_grads in rank order (= batch-chunk order within the EP group).
        parts, weights = got.split(recv), (experts.w1, experts.w2, experts.w3)
        dtype = weights[0].dtype if keeps_fp32(experts) else xs.dtype  # FP8 experts quantise from fp32
        ys = [experts.ffn(parts[s], recv_counts[s], _Tap.apply(self, dtype, *weights))
              for s in reversed(range(W))][::-1]
        return _AllToAll.apply(torch.cat(ys), send, recv, self, "combine")  # (N·K, D) in the caller's slot order


class ChunkOrderedReduceScatter:
    """FSDP2's gradient reduce-scatter as an all-to-all plus a sum in batch-chunk order (same bytes on the wire).

    Each rank's gradient is the gradient of its chunk of the batch; adding the chunks in order is what one process
    does with the same chunks as micro-batches, so training stays bit-identical to it on CPU (a ring
    reduce-scatter adds in an order that depends on the rank, which differs for more than two ranks)."""

    def __init__(self, order: list[int]):
        self.order = order  # order[c]: the rank holding batch chunk c

    def allocate(self, size, *, dtype, device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        assert op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG) and not async_op, op
        W = group.size()
        pieces = torch.empty_like(input_tensor)
        with labelled("FSDP gradient reduce-scatter (chunk-ordered all-to-all)"):
            dist.all_to_all_single(pieces, input_tensor, group=group)
        pieces = pieces.view(W, -1)  # row r: rank r's gradient for this rank's shard
        total = pieces[self.order[0]].clone()
        for r in self.order[1:]:
            total += pieces[r]
        if op == dist.ReduceOp.AVG:
            total /= W
        output_tensor.copy_(total.view_as(output_tensor))


def expert_params(model: Transformer) -> list[torch.nn.Parameter]:
    """The expert-parallel parameters (this rank's expert slices), in a fixed order on every rank."""
    return [p for m in model.modules() if isinstance(m, Experts) and m.dispatch is not None
            for p in (m.w1, m.w2, m.w3)]


def expert_traffic(model: Transformer) -> int:
    """Bytes this rank has sent to other ranks through expert all-to-alls since parallelize (or the last reset)."""
    return sum(m.dispatch.sent_bytes for m in model.modules() if isinstance(m, Experts) and m.dispatch is not None)


def parallelize(model: Transformer, info: DistInfo, dtype: torch.dtype = torch.float32) -> Transformer:
    """Expert parallelism (if --ep), then FSDP2 over all non-expert parameters. Same init on every rank first.

    dtype bf16 is mixed precision as in one process (runtime.MixedPrecision): FSDP2 all-gathers bf16 copies of the
    fp32 shards for the forward (`MixedPrecisionPolicy(param_dtype=bf16)`) and reduces their gradients in fp32,
    while the parameters that stay fp32 in every precision (runtime.keeps_fp32: router, norms, FP8 layers) are
    their own FSDP units with no cast, and the embedding stays whole on every rank. Block inputs are not cast,
    so the residual stream stays fp32. Expert-parallel weights are outside FSDP: the dispatch casts them for its
    GEMMs (`_Tap`)."""
    if not info.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if info.ep > 1:
        for name, m in model.named_modules():
            if isinstance(m, Experts):  # FP8Experts too: the dispatch reuses its ffn and matmul
                El = m.n_experts // info.ep
                lo = info.ep_rank * El
                for p in ("w1", "w2", "w3"):
                    setattr(m, p, torch.nn.Parameter(getattr(m, p).detach()[lo:lo + El].clone()))
                m.dispatch = ExpertDispatch(name, m.n_experts, info)
    experts = set(expert_params(model))
    ignored = experts | {p for p in model.parameters() if not _shards_aligned(p, info.world)}
    units, keep = list(model.layers) + list(model.mtp) + [model], []
    policy = MixedPrecisionPolicy()  # fp32: no cast
    if dtype != torch.float32:
        # the embedding runs twice per forward (main model and MTP), which a nested FSDP unit does not support:
        # it stays whole on every rank, in fp32, like the unaligned parameters
        ignored |= set(model.embed.parameters())
        stay = fp32_params(model)
        unmanaged = [n for n, p in model.named_parameters() if p in ignored and id(p) not in stay and p not in experts]
        if unmanaged:  # FSDP would not cast them, and the forward would mix dtypes
            raise ValueError(f"--precision bf16 with {info.world} processes: parameter {unmanaged[0]} cannot be "
                             "sharded evenly; use --precision fp32 or another world size")
        keep = [m for m in model.modules() if m is not model and keeps_fp32(m)
                and any(p not in ignored for p in m.parameters(recurse=False))]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    order = [info.rank_of_chunk(c) for c in range(info.world)]
    for module in keep + units:  # inner units first: an outer unit leaves their parameters to them
        fully_shard(module, mesh=info.mesh, ignored_params=ignored or None,
                    mp_policy=MixedPrecisionPolicy() if module in keep else policy)
        module.set_custom_reduce_scatter(ChunkOrderedReduceScatter(order))
    return model


ALIGN = 64  # elements: a multiple of every CPU vector width (fp32 AVX-512: 16; bf16: 32)


def _shards_aligned(p: torch.nn.Parameter, world: int) -> bool:
    """Whether FSDP's dim-0 shards of p start at multiples of ALIGN elements.

    torch's fused CPU AdamW rounds the vectorised body of a tensor and its scalar tail differently (FMA), so an
    update is the same on a shard as on the whole tensor only if the shard keeps the vector alignment. The few
    parameters that would not (norm weights of 16 or 32 elements on 4 ranks) stay whole on every rank."""
    rows = -(-p.shape[0] // world) if p.dim() else 0
    return rows * (p.numel() // max(p.shape[0], 1) if p.dim() else 1) % ALIGN == 0 and rows > 0


def replicated_params(model: Transformer) -> list[torch.nn.Parameter]:
    """Parameters kept whole on every rank (not FSDP-sharded, not expert-parallel), in a fixed order."""
    experts = set(map(id, expert_params(model)))
    return [p for p in model.parameters() if not hasattr(p, "to_local") and id(p) not in experts]


def finish_grads(model: Transformer, info: DistInfo) -> None:
    """Gradients FSDP does not reduce, after backward: summed over every rank's chunk in chunk order, divided by the
    world size (each chunk's gradient is that of its own mean loss), as FSDP's average does for the rest.

    Expert weights: their dispatchers' sums. Replicated parameters: one all-gather of every rank's gradients."""
    whole = replicated_params(model)
    if whole:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in whole])
        gathered = flat.new_empty(info.world * flat.numel())
        with labelled("replicated-parameter gradient all-gather"):
            dist.all_gather_single(gathered, flat)
        gathered = gathered.view(info.world, -1)
        total = gathered[info.rank_of_chunk(0)].clone()
        for c in range(1, info.world):
            total += gathered[info.rank_of_chunk(c)]
        for p, g in zip(whole, total.div_(info.world).split([p.numel() for p in whole])):
            p.grad = g.view_as(p)
    for m in model.modules():
        if isinstance(m, Experts) and m.dispatch is not None:
            params = (m.w1, m.w2, m.w3)
            total, m.dispatch.grad_sum = m.dispatch.grad_sum, None
            if total is None:  # no backward this step
                total = torch.zeros(sum(p.numel() for p in params), device=m.w1.device, dtype=m.w1.dtype)
            for p, g in zip(params, total.split([p.numel() for p in params])):
                p.grad = g.view_as(p).div_(info.world)


def grad_norm_and_clip(model: Transformer, max_norm: float, info: DistInfo) -> float:
    """Global gradient norm over FSDP shards (disjoint across ranks), experts (counted once: DP replica 0) and
    replicated parameters (counted once: rank 0), clipped in place. One process uses it too, so that both compute the same coefficient."""
    experts = set(map(id, expert_params(model)))
    whole = set(map(id, replicated_params(model))) if info.enabled else set()
    sq = torch.zeros((), dtype=torch.float64, device=info.device)
    for p in model.parameters():
        if p.grad is None or (id(p) in experts and info.dp_rank != 0) or (id(p) in whole and info.rank != 0):
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        sq += g.double().pow(2).sum()
    if info.enabled:
        with labelled("gradient-norm all-reduce"):
            dist.all_reduce(sq)
    norm = float(sq.sqrt())
    # fp32 coefficient: the sum of squares adds its shards in another order than one process, a last-bit
    # difference in float64 that must not reach the gradients
    coef = torch.tensor(max_norm / (norm + 1e-6), dtype=torch.float32).item()
    if coef < 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def barrier(info: DistInfo) -> None:
    """Wait for every rank (on the host group: the others may wait long for rank 0)."""
    if info.enabled:
        with labelled("barrier"):
            dist.barrier(group=info.host_group)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's obj on every rank (any picklable value; the others pass anything)."""
    if not info.enabled:
        return obj
    box = [obj]
    with labelled("broadcast from rank 0"):
        dist.broadcast_object_list(box, src=0, group=info.host_group)
    return box[0]


def all_reduce_(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Sum the tensors over all ranks, in one bucket per dtype."""
    if not info.enabled or not tensors:
        return
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.flatten() for t in group])
        with labelled("metrics all-reduce"):
            dist.all_reduce(flat)
        for t, v in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(v.view_as(t))


# ----------------------------------------------------------------------------- checkpoints


def _as_shards(t, info: DistInfo):
    """A local expert tensor (this rank's slice of the expert dim) as a DTensor DCP can reshard."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if info.ep > 1 and isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.dim() > 0:
        return DTensor.from_local(t, info.expert_mesh, [Replicate(), Shard(0)], run_check=False)
    return t


def _dcp_view(model_sd: dict, optim_sd: dict, names: set[str], info: DistInfo) -> tuple[dict, dict]:
    """Model and optimizer state with every expert tensor (weights and their moments) shown as shards."""
    model_sd = {k: _as_shards(v, info) if k in names else v for k, v in model_sd.items()}
    state = {k: ({n: _as_shards(t, info) for n, t in v.items()} if k in names else v)
             for k, v in optim_sd.get("state", {}).items()}
    return model_sd, {**optim_sd, "state": state}


def _local(x):
    return x.to_local() if hasattr(x, "to_local") else x


def save_dcp(path, model: Transformer, optimizer, info: DistInfo) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = _dcp_view(*get_state_dict(model, optimizer), _expert_names(model), info)
    with labelled("DCP checkpoint save"):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), process_group=info.host_group)


def load_dcp(path, model: Transformer, optimizer, info: DistInfo) -> None:
    """Load a DCP checkpoint written at any world size or layout into this (possibly single-process) one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    names = _expert_names(model)
    model_sd, optim_sd = _dcp_view(*get_state_dict(model, optimizer), names, info)
    groups = optim_sd["param_groups"]  # this run's grouping (it differs between layouts); hyperparameters are
    with labelled("DCP checkpoint load"):  # the config's
        dcp.load({"model": model_sd, "optim": {"state": optim_sd["state"]}}, checkpoint_id=str(path),
                 process_group=info.host_group)
    optim_sd["param_groups"] = groups
    model_sd = {k: _local(v) if k in names else v for k, v in model_sd.items()}
    optim_sd["state"] = {k: ({n: _local(t) for n, t in v.items()} if k in names else v)
                         for k, v in optim_sd["state"].items()}
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def _expert_names(model: Transformer) -> set[str]:
    ids = set(map(id, expert_params(model)))
    return {n for n, p in model.named_parameters() if id(p) in ids}


def full_model_state(model: Transformer, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (FSDP shards gathered, experts concatenated); None elsewhere."""
    if not info.enabled:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with labelled("full-model gather for model.safetensors"):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        for name in sorted(_expert_names(model)):
            local = sd[name].contiguous()
            parts = [torch.empty_like(local) for _ in range(info.ep)]
            dist.all_gather(parts, local, group=info.ep_group)
            sd[name] = torch.cat(parts)
    return sd if info.main else None
