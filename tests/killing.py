"""The kill half of the resume tests (sft, grpo, distill): a command started in a process of its own and killed
with SIGKILL, the way a crash or an OOM killer ends a run, once it has written a given checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def kill_after(args: list[str], checkpoint: Path) -> None:
    """Run `nanoseek ARGS` and SIGKILL it as soon as `checkpoint` exists (possibly mid-step or mid-save)."""
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120  # a safety net for a hung child, not a speed bound
    while time.time() < deadline and not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_resumed_like_uninterrupted(a: Path, b: Path, step: str) -> None:
    """Run b (killed, then resumed) ends with the uninterrupted run a's weights at checkpoint `step`, bit for bit;
    only b's latest checkpoint keeps the training state, and every checkpoint of b still verifies."""
    import torch
    from safetensors.torch import load_file

    from nanoseek import checkpoint as ckpt

    wa, wb = (load_file(str(d / "checkpoints" / step / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [(d / "train_state").exists() for d in ckpt.step_dirs(b)] == [False, False, True]
    for d in ckpt.step_dirs(b):
        ckpt.verify(d)
