import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same RNG state and thread count."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
