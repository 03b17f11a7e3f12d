"""The continuous-batching engine serves V3.2 and V4 models as it serves V3: their model-level caches take the
batcher's row views and row copies, so requests that join late, leave early and reuse freed rows decode
exactly what the full forward pass predicts."""

import pytest
import torch

from nanoseek import build_model, get_preset
from nanoseek.engine import Batcher, Request, SamplingParams


@pytest.mark.parametrize("preset", ["tiny-v32", "tiny-v4"])
def test_batcher_rows_join_leave_and_are_reused(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset, vocab_size=300)).eval()
    specs = [([1, 2, 3, 4], 3), ([5, 6], 14), ([1, 2, 3, 4], 9), ([7, 8, 9, 10, 11, 12, 13], 5), ([9, 3], 11)]
    batcher = Batcher(model, max_batch=2)  # five requests through two rows: rows are freed, compacted, reused
    reqs = [Request(p, SamplingParams(max_new_tokens=n, temperature=0), seed=i) for i, (p, n) in enumerate(specs)]
    for r in reqs[:3]:
        batcher.submit(r)
    batcher.step()
    for r in reqs[3:]:  # late arrivals
        batcher.submit(r)
    while batcher.busy:
        batcher.step()
    with torch.no_grad():
        for (prompt, n), r in zip(specs, reqs):
            tokens = r.generation().tokens
            assert len(tokens) == n
            logits = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
            assert logits.argmax(-1).tolist() == tokens, (preset, prompt)
