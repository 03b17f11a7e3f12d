"""DeepSeek's fine-grained FP8 block format (reference/deepseek-v3.md §3).

Weights are stored as float8_e4m3fn with one fp32 multiplier per 128×128 block (`weight_scale_inv` in the
checkpoints: despite its name, dequantisation is W ≈ q · scale_inv). Edge blocks of shapes that are not
multiples of 128 are scaled by the amax of their valid part, as if zero-padded to 128.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains inf or nan; FP8 scales need finite values")


def _block_view(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad a 2-D tensor to multiples of `block` and view it as (M/b, b, N/b, b)."""
    M, N = w.shape
    mb, nb = -(-M // block), -(-N // block)
    padded = torch.nn.functional.pad(w, (0, nb * block - N, 0, mb * block - M))
    return padded.view(mb, block, nb, block), mb, nb


def quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N) weight -> (float8_e4m3fn (M, N), fp32 scale_inv (ceil(M/b), ceil(N/b))) with w ≈ q · scale_inv."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(w.shape)}")
    wf = w.float()
    _check_finite(wf, "weight")
    blocks, mb, nb = _block_view(wf, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)  # (M/b, N/b); the clamp avoids 0/0 on zero blocks
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(mb * block, nb * block)[: w.shape[0], : w.shape[1]].to(torch.float8_e4m3fn)
    return q, scale


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
