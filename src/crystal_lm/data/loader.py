"""Batches for a stage: mixture → packed window → (FIM) → input ids, labels, loss mask.

The batch of step t is the global samples [t·B, (t+1)·B) of the stage; a rank of a data-parallel group takes
its contiguous slice. Everything is a function of (seed, stage, step), so resuming needs only the step.
A background process (or thread) prepares the next batches while the model trains on the current one.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
        return _to_batch(self.batch_arrays(step, rank, world_size))

    def batch_arrays(self, step: int, rank: int = 0, world_size: int = 1) -> tuple:
        """The batch as NumPy arrays (input ids, labels, loss mask), sources and FIM segment count."""
        B = self.recipe.train.batch_size
        per_rank = B // world_size
        start = step * B + rank * per_rank
        rows = [self.sample(g) for g in range(start, start + per_rank)]
        return (
            np.stack([r[0] for r in rows]).astype(np.int64),
            np.stack([r[1] for r in rows]).astype(np.int64),
            np.stack([r[2] for r in rows]),
            [r[3] for r in rows],
            sum(r[4] for r in rows),
        )

    def batches(
        self,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        worker: str = "process",
    ) -> Iterator[tuple[int, Batch]]:
        """Batches of steps [start_step, end_step), prepared `prefetch` steps ahead by a worker.

        `process` (where the platform can fork): a child process, so tokenizing and FIM never hold the GIL
        the training loop needs to launch its work (a thread cost a stand-in 1.3B H100 step 2-6 %; see
        benchmarks/NOTES.md); the arrays come back through shared memory. `thread`: a thread here.
        """
        if worker == "process" and "fork" in mp.get_all_start_methods():
            yield from self._batches_forked(start_step, end_step, rank, world_size, prefetch)
        else:
            yield from self._batches_threaded(start_step, end_step, rank, world_size, prefetch)

    def _batches_forked(
        self, start_step: int, end_step: int, rank: int, world_size: int, prefetch: int
    ) -> Iterator[tuple[int, Batch]]:
        ctx = mp.get_context("fork")  # the child shares this stage's memory-mapped shards and tokenizer
        slots = _Slots(prefetch, self.recipe.train.batch_size // world_size, self.recipe.data.seq_len)
        free, ready = ctx.Queue(), ctx.Queue()
        for k in range(prefetch):
            free.put(k)
        # The child must not inherit `tokenizers`' thread pool state noisily: it only encodes FIM pieces.
        configured = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        child = ctx.Process(
            target=_produce,
            args=(self, start_step, end_step, rank, world_size, slots, free, ready, os.getpid()),
            daemon=True,
            name="crystal-data",
        )
        try:
            child.start()
        finally:
            if configured is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = configured
        try:
            for _ in range(start_step, end_step):
                while True:
                    try:
                        item = ready.get(timeout=5.0)
                        break
                    except queue.Empty:
                        if not child.is_alive():
                            raise RuntimeError(
                                f"the data loader process stopped (exit code {child.exitcode}) without an error "
                                "message; it may have run out of memory"
                            ) from None
                if isinstance(item, str):
                    raise RuntimeError(f"the data loader process failed:\n{item}")
                step, slot, rest = item
                arrays = tuple(a.copy() for a in slots.views(slot)) + rest  # the slot is refilled next
                free.put(slot)
                yield step, _to_batch(arrays)
        finally:
            child.terminate()
            child.join(timeout=5)
            # Nothing left in the queues matters once the child is gone. Without this, exiting after a Ctrl-C
            # that landed inside `free.put` can wait forever on the queue's feeder thread.
            for q in (free, ready):
                q.cancel_join_thread()
                q.close()

    def _batches_threaded(
        self, start_step: int, end_step: int, rank: int, world_size: int, prefetch: int
    ) -> Iterator[tuple[int, Batch]]:
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


def _to_batch(arrays: tuple) -> Batch:
    input_ids, labels, loss_mask, sources, fim_segments = arrays
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        sources=sources,
        fim_segments=fim_segments,
    )


class _Slots:
    """`n` buffers of anonymous shared memory, made before the fork so parent and child map the same pages,
    each holding one batch's arrays: only a slot number and the sources cross the pipe (pickling the
    arrays cost the training loop 1.2 ms a step on a 1.3B batch)."""

    def __init__(self, n: int, rows: int, seq_len: int) -> None:
        self.layout = (
            ((rows, seq_len), np.int64),
            ((rows, seq_len), np.int64),
            ((rows, seq_len), np.float32),
        )
        nbytes = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in self.layout)
        self.buffers = [mmap.mmap(-1, nbytes) for _ in range(n)]  # MAP_SHARED | MAP_ANONYMOUS

    def views(self, k: int) -> tuple[np.ndarray, ...]:
        out, offset = [], 0
        for shape, dtype in self.layout:
            count = int(np.prod(shape))
            out.append(np.frombuffer(self.buffers[k], dtype=dtype, count=count, offset=offset).reshape(shape))
            offset += count * np.dtype(dtype).itemsize
        return tuple(out)


def _produce(
    stage: StageData,
    start_step: int,
    end_step: int,
    rank: int,
    world_size: int,
    slots: _Slots,
    free: Any,
    ready: Any,
    parent: int,
) -> None:
    """The loader process: each batch's arrays into a free slot, then (step, slot, sources and FIM count)
    into `ready`; or the traceback of what went wrong."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it ends this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever handler the trainer had, terminate() ends us
    try:
        for step in range(start_step, end_step):
            ids, labels, mask, sources, fim_segments = stage.batch_arrays(step, rank, world_size)
            slot = _get(free, parent)
            if slot is None:
                return
            for view, array in zip(slots.views(slot), (ids, labels, mask), strict=True):
                view[...] = array  # a shape that does not fit raises, and the trainer sees why
            ready.put((step, slot, (sources, fim_segments)))
    except BaseException:
        ready.put(traceback.format_exc())


def _get(q: Any, parent: int) -> Any:
    """The next item of `q`; None when the trainer process is gone (do not linger as an orphan)."""
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None
