"""The training stages' progress bar (grpo, sft, distill)."""

from __future__ import annotations


class StageBar:
    """A training stage's progress bar, against the limit that will end the run.

    Without --max-seconds / --max-flops that is the step count: the bar counts steps and reaches N/N on the last
    one. With either, the step count is only a ceiling (a budgeted run passes --steps 100000) and a bar over it
    would promise an ETA of days: the bar then shows the percentage of whichever limit is furthest along (steps,
    seconds or FLOPs; the step count stays in the postfix), and its ETA is that limit's."""

    PARTS = 1000  # resolution of a limited bar (tqdm counts integers)

    def __init__(self, desc: str, steps: int, done: int = 0, max_seconds: float = 0.0, max_flops: float = 0.0,
                 seconds: float = 0.0, flops: float = 0.0, file=None):
        """`done`, `seconds`, `flops`: where a resumed run starts (tqdm's rate, hence the ETA, counts from there)."""
        from tqdm import tqdm

        self.steps, self.max_seconds, self.max_flops = steps, max_seconds, max_flops
        self.limited = bool(max_seconds or max_flops)
        if self.limited:
            self.bar = tqdm(total=self.PARTS, initial=self._parts(done, seconds, flops), desc=desc,
                            dynamic_ncols=True, file=file,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=steps, initial=done, desc=desc, unit="step", dynamic_ncols=True, file=file)

    def _parts(self, step: int, seconds: float, flops: float) -> int:
        done = max(step / self.steps, seconds / self.max_seconds if self.max_seconds else 0.0,
                   flops / self.max_flops if self.max_flops else 0.0)
        return min(self.PARTS, int(done * self.PARTS))

    def update(self, step: int, seconds: float = 0.0, flops: float = 0.0, **postfix) -> None:
        """Show the state after `step` steps, `seconds` of training and `flops` (what the limits count)."""
        if self.limited:
            self.bar.update(self._parts(step, seconds, flops) - self.bar.n)
            self.bar.set_postfix(step=step, **postfix)
        else:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()
