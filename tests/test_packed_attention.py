"""segment_attention (packed SFT rows, blockwise over the visible keys) against masked_sdpa (one SDPA, full mask)."""

import pytest
import torch

from nanoseek.packed_attention import masked_sdpa, segment_attention, segment_starts


def _segments(lengths: list[list[int]], T: int) -> torch.Tensor:
    """Rows of consecutive segments of the given lengths, the rest padding (id -1), as sft.pack lays them out."""
    rows = []
    for row in lengths:
        ids = [s for s, n in enumerate(row) for _ in range(n)]
        rows.append(ids + [-1] * (T - len(ids)))
    return torch.tensor(rows)


def test_segment_starts():
    seg = _segments([[3, 2], [1, 4]], 7)
    assert segment_starts(seg).tolist() == [[0, 0, 0, 3, 3, 5, 5], [0, 1, 1, 1, 1, 5, 5]]


# segments shorter than, equal to and longer than a block; a row ending in padding; T not a multiple of the block
LAYOUT = [[5, 17, 40, 9, 20], [101], [16, 16, 16, 16, 16, 10], [1, 2, 3, 70, 25]]


@pytest.mark.parametrize("key_heads", [4, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-2)])
def test_equals_full_mask_attention_values_and_gradients(key_heads, dtype, tol):
    torch.manual_seed(0)
    T, H, d, dv = 101, 4, 24, 16
    seg = _segments(LAYOUT, T)
    q = torch.randn(4, H, T, d).to(dtype).requires_grad_()
    k = torch.randn(4, key_heads, T, d).to(dtype).requires_grad_()
    v = torch.randn(4, key_heads, T, dv).to(dtype).requires_grad_()
    grad_out = torch.randn(4, H, T, dv).to(dtype)
    got, want = [], []
    for fn, out in ((lambda: segment_attention(q, k, v, seg, 0.2, block=16), got),
                    (lambda: masked_sdpa(q, k, v, seg, 0.2), want)):
        o = fn()
        grads = torch.autograd.grad(o, (q, k, v), grad_out)
        out.extend([o, *grads])
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=name)


def test_queries_never_see_other_samples():
    """Changing one sample's keys and values leaves every other sample's outputs bit-identical."""
    torch.manual_seed(0)
    T = 101
    seg = _segments(LAYOUT, T)
    q, k, v = torch.randn(4, 2, T, 8), torch.randn(4, 2, T, 8), torch.randn(4, 2, T, 8)
    before = segment_attention(q, k, v, seg, 0.3, block=16)
    k2, v2 = k.clone(), v.clone()
    other = (seg == 2)[:, None, :, None].expand_as(k)  # sample 2 of every row (rows 0, 2 and 3 have one)
    k2[other] += 1.0
    v2[other] -= 1.0
    after = segment_attention(q, k2, v2, seg, 0.3, block=16)
    keep = ~other
    assert torch.equal(before[keep], after[keep])
    assert not torch.equal(before[~keep], after[~keep])
