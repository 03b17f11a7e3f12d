import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same RNG state and thread count."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def gemm_rows_independent() -> bool:
    """Whether this CPU's fp32 GEMM computes each output row the same whatever the number of rows multiplied with
    it. It does on the Xeons these tests were written on; on an AMD EPYC (Zen 4) MKL takes other paths for
    3-, 7- and 11-row tails and rows move by ~2e-6, so a routing change that resizes one expert's group moves the
    other tokens of that group in the last bits. Tests that compare rows bit for bit ask this first."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 64, generator=gen), torch.randn(64, 32, generator=gen)
    return all(torch.equal(x[:m] @ w, (x[: m + 1] @ w)[:m]) for m in range(1, 40))
