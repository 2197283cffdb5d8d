"""Where training metrics go besides `metrics.jsonl` (always written): TensorBoard event files under
RUN_DIR/tensorboard when `tensorboard` is installed, and Weights & Biases in offline mode (RUN_DIR/wandb,
synced later with `wandb sync`) when `wandb` is installed. A missing package is noted once, never an error."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out |= _scalars(v, f"{prefix}{k}/")
        elif (
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and k not in ("time", "step", "stage_index")
        ):
            out[f"{prefix}{k}"] = float(v)
    return out


class ExtraLoggers:
    def __init__(
        self,
        run_dir: Path,
        recipe_name: str,
        config: dict,
        tensorboard: bool,
        wandb: bool,
        resumed_step: int = 0,
    ) -> None:
        """`resumed_step`: the global step the run resumes from; TensorBoard events logged after it (by the
        interrupted process, which went on past its last checkpoint) are purged, since they are logged again."""
        self.writers: list[Any] = []
        self.tb = self.wb = None
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1)
            else:
                log.info("tensorboard is not installed: no event files (pip install 'crystal-lm[logging]')")
        if wandb and importlib.util.find_spec("wandb") is not None:
            import wandb as wandb_module

            self.wb = wandb_module.init(
                project="crystal-lm", name=recipe_name, dir=str(run_dir), mode="offline", config=config
            )

    def log(self, record: dict[str, Any], step: int, prefix: str = "train/") -> None:
        scalars = _scalars(record, prefix)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
