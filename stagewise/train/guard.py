"""NaN guard: skip non-finite steps on the device, notice runs of them at the next status check.

Each step the loop computes ``finite`` (a 0-d bool tensor: loss and gradient norm are finite) and hands
``found_inf = ~finite`` to a fused Adam, whose kernel then leaves weights and moments untouched and undoes
its step count; a grad scaler (fp16) does the same with its own overflow flag. The guard itself only
counts, on the device: no host sync per step. At each status check (``check``, one sync) it learns the
longest run of skipped steps since the last check; ``tripped`` says whether that run reached
``max_bad_steps``, and the loop then rolls back to the last good backup with a lower LR and a higher
epsilon (see ``loop.StageTrainer.rollback``).

``STAGEWISE_POISON_STEPS=5,6,7`` (a debug switch for tests) turns the batch of each listed step into NaN,
once per process: a rerun of the same step after a rollback is clean, as a transient fault would be.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

POISON_ENV = "STAGEWISE_POISON_STEPS"


class NanGuard:
    def __init__(self, device: torch.device, max_bad_steps: int = 8):
        self.max_bad_steps = max_bad_steps
        self.longest_run = 0  # the longest run of skipped steps the last check saw (host int)
        zero = torch.zeros((), device=device)
        self.run = zero.clone()  # current run of consecutive skipped steps
        self.longest = zero.clone()  # longest run since the last check
        self.skipped = zero.clone()  # skipped steps since the last check
        self.poison = {int(s) for s in os.environ.get(POISON_ENV, "").split(",") if s.strip()}

    def observe(self, finite: torch.Tensor) -> None:
        bad = (~finite).to(self.run.dtype)
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)
        self.skipped = self.skipped + bad

    def check(self) -> tuple[int, int]:
        """(longest run of skipped steps, skipped steps) since the last check; one host sync."""
        longest, skipped = (int(v) for v in torch.stack([self.longest, self.skipped]).tolist())
        self.longest = self.run.clone()  # a run still going on counts towards the next check too
        self.skipped.zero_()
        self.longest_run = longest
        return longest, skipped

    @property
    def tripped(self) -> bool:
        """The last check saw ``max_bad_steps`` or more non-finite steps in a row."""
        return self.longest_run >= self.max_bad_steps

    def reset(self) -> None:
        for t in (self.run, self.longest, self.skipped):
            t.zero_()
        self.longest_run = 0

    def poisoned(self, step: int) -> bool:
        if step in self.poison:
            self.poison.discard(step)
            return True
        return False


def skip_if_not_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor, step_fn: Callable[[], object] | None = None) -> None:
    """``optimizer.step()`` unless ``finite`` is false; on the device when the optimizer is fused."""
    step = step_fn or optimizer.step
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]  # read by the fused kernel
        try:
            step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif bool(finite):  # an optimizer without fused kernels: one host sync
        step()
