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
