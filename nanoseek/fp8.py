"""DeepSeek-V3's fine-grained FP8 (V3 report, arXiv 2412.19437 §3.3).

Format: float8_e4m3fn (max 448) for every tensor. Scales are fp32 multipliers that dequantise (x ≈ q · scale,
W ≈ q · weight_scale_inv), computed online as amax / 448 (optionally rounded up to a power of two, "ue8m0"):
- activations and gradients: one scale per 1×128 tile along the GEMM's reduction dimension;
- weights: one scale per 128×128 block (the layout of DeepSeek's checkpoints, `weight_scale_inv`);
- shapes that are not multiples of 128: the edge tile/block is scaled by the amax of its valid part (as if
  zero-padded, as the official code does).

GEMMs (`fp8_gemm`) take FP8 operands and accumulate each 128-wide slice of the reduction dimension in fp32,
then apply both scales and add into an fp32 accumulator: the promotion-every-128 scheme of the report, emulated
exactly on CPU (fp8 values times each other are exact in fp32). `FP8Linear` runs Fprop, Dgrad and Wgrad this
way; activations saved for the backward stay FP8 and are re-tiled 1×128 → 128×1 for Wgrad. `convert_to_fp8`
swaps the layers DeepSeek runs in FP8 (attention projections, dense MLPs, shared and routed experts, MTP's
eh_proj) and leaves embedding, output head, gate, norms and the attention core in full precision.
The `tensorwise` recipe (one scale per tensor) exists for the ablation that shows why fine-grained scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import Experts, Gate

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128
RECIPES = ("blockwise", "tensorwise")


# ----------------------------------------------------------------------------- quantisation


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains inf or nan; FP8 scales need finite values")


def _scale(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    scale = amax.float().clamp(min=1e-4) / FP8_MAX  # the clamp keeps all-zero tiles finite (DeepSeek, Aug 2025)
    return torch.exp2(torch.ceil(torch.log2(scale))) if ue8m0 else scale


def _cast(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_act(x: torch.Tensor, block: int = BLOCK, ue8m0: bool = False, check: bool = True):
    """(..., K) -> (float8 (..., K), fp32 scale (..., ceil(K/block))): one scale per 1×block tile of the last dim."""
    if check:
        _check_finite(x, "activation")
    K = x.shape[-1]
    nb = -(-K // block)
    xf = F.pad(x.float(), (0, nb * block - K)).view(*x.shape[:-1], nb, block)
    scale = _scale(xf.abs().amax(dim=-1), ue8m0)  # (..., nb)
    q = _cast(xf / scale.unsqueeze(-1)).view(*x.shape[:-1], nb * block)[..., :K]
    return q.contiguous(), scale


def dequantize_act(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32, block: int = BLOCK) -> torch.Tensor:
    K = q.shape[-1]
    return (q.float() * scale.repeat_interleave(block, dim=-1)[..., :K]).to(dtype)


def _block_view(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad a 2-D tensor to multiples of `block` and view it as (M/b, b, N/b, b)."""
    M, N = w.shape
    mb, nb = -(-M // block), -(-N // block)
    padded = F.pad(w, (0, nb * block - N, 0, mb * block - M))
    return padded.view(mb, block, nb, block), mb, nb


def quantize_weight(w: torch.Tensor, block: int = BLOCK, ue8m0: bool = False, check: bool = True):
    """(M, N) weight -> (float8 (M, N), fp32 scale_inv (ceil(M/b), ceil(N/b))) with w ≈ q · scale_inv."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(w.shape)}")
    wf = w.float()
    if check:
        _check_finite(wf, "weight")
    blocks, mb, nb = _block_view(wf, block)
    scale = _scale(blocks.abs().amax(dim=(1, 3)), ue8m0)  # (M/b, N/b)
    q = _cast(blocks / scale[:, None, :, None]).view(mb * block, nb * block)[: w.shape[0], : w.shape[1]]
    return q.contiguous(), scale


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: int = BLOCK) -> torch.Tensor:
    """W[m, n] = q[m, n] · scale_inv[m // b, n // b], computed in fp32 and returned in `dtype`."""
    M, N = q.shape
    mb, nb = -(-M // block), -(-N // block)
    if tuple(scale_inv.shape) != (mb, nb):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
                         f"with {block}x{block} blocks (expected {(mb, nb)})")
    s = scale_inv.float().repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return (q.float() * s).to(dtype)


def quantize_tensorwise(x: torch.Tensor, check: bool = True):
    """One scale for the whole tensor (the ablation recipe): (float8, fp32 scalar scale)."""
    if check:
        _check_finite(x, "tensor")
    scale = _scale(x.abs().amax(), ue8m0=False)
    return _cast(x.float() / scale), scale


# ----------------------------------------------------------------------------- GEMM


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             block: int = BLOCK) -> torch.Tensor:
    """C = A·Bᵀ in fp32 from FP8 operands, promoted to fp32 every `block` elements of the reduction dim K.

    a_q (M, K) with tile scales a_s (M, K/b); b_q (N, K) with either block scales (N/b, K/b) (a weight) or tile
    scales (N, K/b) (an activation, for Wgrad).
    """
    M, K = a_q.shape
    N = b_q.shape[0]
    if b_s.shape[0] != N:  # 128×128 weight blocks: one row of scales per 128 output rows
        b_s = b_s.repeat_interleave(block, dim=0)[:N]
    a, b = a_q.float(), b_q.float()  # fp8 values are exact in fp32, and so are their pairwise products
    if K <= block:
        return (a @ b.T) * (a_s * b_s.T)
    out = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    for kb, k0 in enumerate(range(0, K, block)):
        partial = a[:, k0:k0 + block] @ b[:, k0:k0 + block].T  # one 128-wide slice, summed in fp32
        out.addcmul_(partial, a_s[:, kb:kb + 1] * b_s[:, kb].unsqueeze(0))  # promoted: scaled, accumulated
    return out


def _tensorwise_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    (a_q, a_s), (b_q, b_s) = quantize_tensorwise(a, check=False), quantize_tensorwise(b, check=False)
    return (a_q.float() @ b_q.float().T) * (a_s * b_s)


class _FP8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ with Fprop, Dgrad and Wgrad all on FP8 operands; x is saved as FP8 for the backward."""

    @staticmethod
    def forward(ctx, x, weight, recipe, ue8m0):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.recipe, ctx.ue8m0, ctx.shape, ctx.dtype = recipe, ue8m0, x.shape, x.dtype
        if recipe == "tensorwise":
            y = _tensorwise_gemm(x2, weight)
            ctx.save_for_backward(*quantize_tensorwise(x2, check=False), weight)
        else:
            x_q, x_s = quantize_act(x2, ue8m0=ue8m0, check=False)  # 1×128 tiles along K
            w_q, w_s = quantize_weight(weight, ue8m0=ue8m0, check=False)
            y = fp8_gemm(x_q, x_s, w_q, w_s)
            ctx.save_for_backward(x_q, x_s, weight)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x_q, x_s, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        if ctx.recipe == "tensorwise":
            x = x_q.float() * x_s
            dx = _tensorwise_gemm(g, weight.T)
            dw = _tensorwise_gemm(g.T, x.T)
        else:
            # Dgrad: reduction over N; the weight's 128×128 blocks serve transposed
            g_q, g_s = quantize_act(g, ue8m0=ctx.ue8m0, check=False)
            w_q, w_s = quantize_weight(weight, ue8m0=ctx.ue8m0, check=False)
            dx = fp8_gemm(g_q, g_s, w_q.T.contiguous(), w_s.T.contiguous())
            # Wgrad: reduction over tokens M, so both operands are re-tiled 1×128 → 128×1 (tiles along M)
            x = dequantize_act(x_q, x_s)
            gt_q, gt_s = quantize_act(g.T, ue8m0=ctx.ue8m0, check=False)  # (N, M)
            xt_q, xt_s = quantize_act(x.T, ue8m0=ctx.ue8m0, check=False)  # (K, M)
            dw = fp8_gemm(gt_q, gt_s, xt_q, xt_s)
        return dx.to(ctx.dtype).view(ctx.shape), dw.to(weight.dtype), None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: str = "blockwise", ue8m0: bool = False):
    return _FP8LinearFunction.apply(x, weight, recipe, ue8m0)


# ----------------------------------------------------------------------------- modules


class FP8Linear(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys) whose matmul runs in FP8.

    Under bf16 mixed precision its weight stays fp32 (runtime.FP32_MODULES: quantised from the fp32 master, not
    from a bf16 copy) while its input and output are bf16, like every operation around it (V3 report §3.3)."""

    recipe: str = "blockwise"
    ue8m0: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.recipe, self.ue8m0)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def _fp8_grouped(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, recipe: str, ue8m0: bool) -> torch.Tensor:
    """Grouped x[rows of e] @ w[e] with each group's GEMMs in FP8. w: (E, in, out) as passed by Experts."""
    outs, start = [], 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            outs.append(fp8_linear(x[start:end], w[e].T, recipe, ue8m0))
        start = end
    return torch.cat(outs) if outs else x @ w[0]  # no rows: still an autograd path (same graph on every EP rank)


class FP8Experts(Experts):
    """Routed experts whose grouped GEMMs run in FP8, one expert's token group at a time (weights fp32 under mixed
    precision, as FP8Linear's)."""

    recipe: str = "blockwise"
    ue8m0: bool = False

    def matmul(self, x, w, ends):
        return _fp8_grouped(x, w, ends, self.recipe, self.ue8m0)


def convert_to_fp8(model: nn.Module, recipe: str = "blockwise", ue8m0: bool = False) -> nn.Module:
    """Swap, in place, the layers DeepSeek-V3 trains in FP8; everything else keeps its precision.

    FP8: every nn.Linear inside attention (wq/wq_a/wq_b/wkv_a/wkv_b/wo), dense and shared-expert MLPs, MTP's
    eh_proj, and the routed experts' grouped GEMMs. Not FP8: embedding, output head, gate, norms, and the
    attention core (softmax(QKᵀ)V, including the absorbed path's use of wkv_b).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    keep = {id(model.head)} | {id(m) for m in model.modules() if isinstance(m, Gate)}
    for m in model.modules():
        if type(m) is nn.Linear and id(m) not in keep:
            m.__class__ = FP8Linear
            m.recipe, m.ue8m0 = recipe, ue8m0
        elif type(m) is Experts:
            m.__class__ = FP8Experts
            m.recipe, m.ue8m0 = recipe, ue8m0
    return model


def fp8_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Parameter name -> (fp8 weight, weight_scale_inv) for every weight DeepSeek ships in FP8 (2-D projections)."""
    out = {}
    skip = {id(model.head)} | {id(m) for m in model.modules() if isinstance(m, Gate)}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and id(m) not in skip:
            out[f"{name}.weight"] = quantize_weight(m.weight.detach())
        elif isinstance(m, Experts):
            for p in ("w1", "w2", "w3"):
                w = getattr(m, p).detach()
                out[f"{name}.{p}"] = [quantize_weight(w[e]) for e in range(w.shape[0])]
    return out
