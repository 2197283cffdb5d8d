"""The stability guard: a step whose loss or gradient norm is not finite, or whose loss spikes far above the
recent mean (of up to 20 steps, from the third step on), is skipped (the optimizer does not step) and logged; too many in a row stop the run with the
reason, so a diverged run never writes further checkpoints. Its state is saved with each checkpoint."""

from __future__ import annotations

import math
from collections import deque


class TrainingDiverged(RuntimeError):
    pass


class StabilityGuard:
    def __init__(self, spike_factor: float | None, max_in_row: int, window: int = 20) -> None:
        self.spike_factor, self.max_in_row = spike_factor, max_in_row
        self.recent: deque[float] = deque(maxlen=window)
        self.in_row = 0
        self.skipped = 0

    def check(self, loss: float, grad_norm: float, where: str) -> str | None:
        """None to take the step, or why it is skipped. Raises after `max_in_row` skips in a row."""
        reason = None
        if not math.isfinite(loss):
            reason = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm ({grad_norm})"
        elif self.spike_factor and len(self.recent) >= 2:  # from the third step: early divergence counts
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                reason = f"loss spike ({loss:.4g} > {self.spike_factor:g} × recent mean {mean:.4g})"
        if reason is None:
            self.in_row = 0
            self.recent.append(loss)
            return None
        self.in_row += 1
        self.skipped += 1
        if self.in_row >= self.max_in_row:
            raise TrainingDiverged(
                f"{where}: {self.in_row} steps in a row skipped (last: {reason}). The run stops here."
            )
        return reason

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "in_row": self.in_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.recent.extend(state.get("recent", []))
        self.in_row, self.skipped = state.get("in_row", 0), state.get("skipped", 0)
