"""Scale-out with torch.distributed: process groups from torchrun, FSDP2 data parallelism, expert parallelism,
and torch.distributed.checkpoint (DCP) checkpoints that resume at another world size.

- Data parallelism: every Block and the root are `fully_shard`ed (FSDP2): parameters, gradients and optimizer
  state are sharded across ranks; each rank trains on its slice of the global batch, and FSDP averages the
  gradients, so the step equals one process on the whole batch.
- Expert parallelism (`--ep`, here over all ranks): each MoE layer's routed experts are split across the
  ranks; every rank routes its own tokens, sends each token slot to the rank owning its expert with
  `all_to_all_single`, runs its local experts as one grouped GEMM, and sends the results back (V3: EP64).
  FSDP leaves the expert weights alone; their gradients (summed over every rank's tokens by the backward
  all-to-all) are divided by the world size to match the mean loss. The routing bias is updated from the
  global expert load (all-reduced), so it stays identical on every rank.
- Checkpoints: DCP writes each rank's shards (experts as DTensors sharded over the expert dim); loading at a
  different world size, including one process, reshards. Rank 0 also writes the full model.safetensors, so
  `generate`, `eval` and `export` work on a distributed run's checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from .model import Experts, Transformer, grouped_mm


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    ep: int = 1
    mesh: object = None  # the 1-D DeviceMesh over all ranks (None for a single process)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device, ep: int = 1) -> DistInfo:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); a plain process gets world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if ep > 1:
            raise ValueError(f"--ep {ep} needs {ep} processes: launch with torchrun --nproc_per_node={ep}")
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if ep not in (1, world):
        raise ValueError(f"--ep must be 1 or the world size ({world}); got {ep}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    return DistInfo(rank=rank, world=world, ep=ep, mesh=mesh)


def check_layout(cfg, info: DistInfo, batch_size: int, micro_batch: int) -> None:
    """One clear error for an impossible layout."""
    if batch_size % info.world:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the world size {info.world}")
    if micro_batch and (batch_size // info.world) % micro_batch:
        raise ValueError(f"per-rank batch {batch_size // info.world} must be a multiple of --micro-batch {micro_batch}")
    if info.ep > 1 and cfg.n_routed_experts % info.ep:
        raise ValueError(f"{cfg.n_routed_experts} routed experts cannot be split over --ep {info.ep} ranks")


# ----------------------------------------------------------------------------- expert parallelism


class EPExperts(Experts):
    """This rank's slice of the routed experts; tokens travel to their experts and back by all-to-all."""

    def setup_ep(self, rank: int, world: int) -> None:
        E = self.w1.shape[0]
        self.ep_rank, self.ep_world, self.n_global = rank, world, E
        self.n_local = E // world
        lo, hi = rank * self.n_local, (rank + 1) * self.n_local
        for name in ("w1", "w2", "w3"):
            setattr(self, name, torch.nn.Parameter(getattr(self, name).detach()[lo:hi].clone()))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        N, K = indices.shape
        W, El = self.ep_world, self.n_local
        order = indices.flatten().argsort(stable=True)  # slots grouped by global expert, hence by owner rank
        counts = torch.bincount(indices.flatten(), minlength=self.n_global)  # (E,)
        xs = x[order // K]  # (N·K, D)
        recv_counts = torch.empty_like(counts)  # recv_counts[s·El + j]: slots from rank s for my expert j
        dist.all_to_all_single(recv_counts, counts)
        send = counts.view(W, El).sum(1).tolist()
        recv = recv_counts.view(W, El).sum(1).tolist()
        # rows leaving this rank in the forward (dispatch out + results back); the backward mirrors them
        self.remote_rows = getattr(self, "remote_rows", 0) + (sum(send) - send[self.ep_rank]) + (
            sum(recv) - recv[self.ep_rank])
        got = all_to_all_single_autograd(xs, recv, send, dist.group.WORLD)  # (sum(recv), D) by source rank
        by_expert = _source_to_expert_order(recv_counts.view(W, El))  # regroup by local expert
        h_in = got[by_expert]
        ends = recv_counts.view(W, El).sum(0).cumsum(0).to(torch.int32)
        if h_in.shape[0] == 0:  # no token chose this rank's experts
            y_local = h_in.new_zeros(0, self.w2.shape[1])
        else:
            h = torch.nn.functional.silu(grouped_mm(h_in, self.w1.transpose(1, 2), ends)) * grouped_mm(
                h_in, self.w3.transpose(1, 2), ends)
            y_local = grouped_mm(h, self.w2.transpose(1, 2), ends)
        y_back = y_local[torch.argsort(by_expert)]  # back to source-rank order
        ys = all_to_all_single_autograd(y_back, send, recv, dist.group.WORLD)  # (N·K, D) in `order`
        slot_out = torch.empty_like(ys).index_copy(0, order, ys)  # (N·K, D) in (token, k) order
        return torch.bmm(weights.unsqueeze(1), slot_out.view(N, K, -1)).squeeze(1)


def _source_to_expert_order(recv: torch.Tensor) -> torch.Tensor:
    """Row permutation turning [source0: e0 e1 …, source1: e0 e1 …] into [e0: s0 s1 …, e1: …]."""
    W, El = recv.shape
    starts = torch.cat([torch.zeros(1, dtype=recv.dtype), recv.flatten().cumsum(0)[:-1]]).view(W, El)
    pieces = [torch.arange(int(starts[s, j]), int(starts[s, j] + recv[s, j])) for j in range(El) for s in range(W)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def expert_params(model: Transformer) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, EPExperts) for p in (m.w1, m.w2, m.w3)]


def parallelize(model: Transformer, info: DistInfo) -> Transformer:
    """Expert parallelism (if --ep), then FSDP2 over all non-expert parameters. Same init on every rank first."""
    if not info.enabled:
        return model
    from torch.distributed.fsdp import fully_shard

    if info.ep > 1:
        for m in model.modules():
            if type(m) is Experts:
                m.__class__ = EPExperts
                m.setup_ep(info.rank, info.world)
    ignored = set(expert_params(model))
    for block in list(model.layers) + list(model.mtp):
        fully_shard(block, mesh=info.mesh, ignored_params=ignored or None)
    fully_shard(model, mesh=info.mesh, ignored_params=ignored or None)
    return model


def finish_grads(model: Transformer, info: DistInfo) -> None:
    """Expert gradients hold the sum over every rank's loss: divide by the world size to match the mean."""
    for p in expert_params(model):
        if p.grad is not None:
            p.grad.div_(info.world)


def grad_norm_and_clip(model: Transformer, max_norm: float, info: DistInfo) -> float:
    """Global gradient norm over FSDP-sharded and expert parameters (disjoint across ranks); clips in place."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        sq += g.double().pow(2).sum()  # FSDP shards and local experts are disjoint across ranks
    if info.enabled:
        dist.all_reduce(sq)
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_(tensors: list[torch.Tensor], info: DistInfo, average: bool = False) -> None:
    if not info.enabled:
        return
    for t in tensors:
        dist.all_reduce(t)
        if average:
            t.div_(info.world)


# ----------------------------------------------------------------------------- checkpoints


def _as_shards(t, info: DistInfo):
    """A local expert tensor (this rank's slice of the expert dim) as a DTensor DCP can reshard."""
    from torch.distributed.tensor import DTensor, Shard

    if info.ep > 1 and isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.dim() > 0:
        return DTensor.from_local(t, info.mesh, [Shard(0)], run_check=False)
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
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_dcp(path, model: Transformer, optimizer, info: DistInfo) -> None:
    """Load a DCP checkpoint written at any world size into this (possibly single-process) layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    names = _expert_names(model)
    model_sd, optim_sd = _dcp_view(*get_state_dict(model, optimizer), names, info)
    groups = optim_sd["param_groups"]  # this run's grouping (it differs between layouts); hyperparameters are
    dcp.load({"model": model_sd, "optim": {"state": optim_sd["state"]}}, checkpoint_id=str(path))  # the config's
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

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    for name in sorted(_expert_names(model)):
        local = sd[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(info.world)]
        dist.all_gather(parts, local)
        sd[name] = torch.cat(parts)
    return sd if info.main else None
