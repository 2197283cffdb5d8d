"""Batches for a stage: mixture → packed window → (FIM) → input ids, labels, loss mask.

The batch of step t is the global samples [t·B, (t+1)·B) of the stage; a rank of a data-parallel group takes
its contiguous slice. Everything is a function of (seed, stage, step), so resuming needs only the step.
A background thread prepares the next batches while the model trains on the current one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from crystal_lm.config import Recipe
from crystal_lm.data.fim import apply_fim
from crystal_lm.data.mixture import Mixture, _rng
from crystal_lm.data.prepare import PreparedData


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, L] int64
    labels: torch.Tensor  # [b, L] int64
    loss_mask: torch.Tensor  # [b, L] float32
    sources: list[str]
    fim_segments: int


class StageData:
    def __init__(self, recipe: Recipe, data: PreparedData, stage_index: int) -> None:
        self.recipe, self.data, self.stage_index = recipe, data, stage_index
        stage = recipe.stages[stage_index]
        self.stage = stage
        self.mixture = Mixture(
            stage.mixture,
            {n: len(data.train[n]) for n in stage.mixture},
            recipe.seed,
            stage_index,
            block=recipe.data.mixture_block,
            subsets=stage.subsets,
        )
        self.fim_sources = {
            n for n in stage.mixture if stage.fim.applies_to(n, recipe.data.sources[n].domain)
        }

    def sample(self, global_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int]:
        source, i = self.mixture(global_index)
        window = self.data.train[source].window(i)
        L = self.recipe.data.seq_len
        if source in self.fim_sources:
            rng = _rng(self.recipe.seed, self.stage_index, "fim", global_index)
            rate = self.stage.fim.rate_for(source, self.recipe.data.sources[source].domain)
            r = apply_fim(window.tokens[:L], self.data.tokenizer, rng, rate, self.stage.fim.spm_rate)
            return r.input_ids, r.labels, r.loss_mask, source, r.n_fim_segments
        mask = np.zeros(L, dtype=np.float32)
        mask[: window.valid - 1] = 1.0  # the padded tail of the last window is not trained on
        return window.tokens[:L], window.tokens[1:], mask, source, 0

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        B = self.recipe.train.batch_size
        per_rank = B // world_size
        start = step * B + rank * per_rank
        rows = [self.sample(g) for g in range(start, start + per_rank)]
        return Batch(
            input_ids=torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64)),
            labels=torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64)),
            loss_mask=torch.from_numpy(np.stack([r[2] for r in rows])),
            sources=[r[3] for r in rows],
            fim_segments=sum(r[4] for r in rows),
        )

    def batches(
        self, start_step: int, end_step: int, rank: int = 0, world_size: int = 1, prefetch: int = 2
    ) -> Iterator[tuple[int, Batch]]:
        """Batches of steps [start_step, end_step), prepared `prefetch` steps ahead in a thread."""
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for step in range(start_step, end_step):
                    if stop.is_set():
                        return
                    q.put((step, self.batch(step, rank, world_size)))
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)

        thread = threading.Thread(target=work, daemon=True, name="crystal-data")
        thread.start()
        try:
            for _ in range(start_step, end_step):
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
