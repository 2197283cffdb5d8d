"""Run logs: JSONL files that survive interruption, and a progress line with tokens/s and ETA."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class JsonlError(ValueError):
    """A JSONL log with an invalid line before its last one: not a torn write, so not skipped silently."""


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (left by a kill mid-write: not JSON), with a warning; end a whole last record
    that lacks its newline with one. Then appended records start on a line of their own."""
    data = path.read_bytes()
    if not data:
        return
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        print(f"warning: {path}: removing a torn last line (cut by an interruption)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(start)
        return
    if not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log. A last line cut by a kill is skipped with a warning; any other invalid line is
    an error naming the file and line (reading on past it, or stopping there, would hide records)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                print(
                    f"warning: {path}:{n}: skipping a torn last line (cut by an interruption)",
                    file=sys.stderr,
                )
                break
            raise JsonlError(f"{path}:{n}: not a JSON record ({e.msg}); fix or remove this line") from None
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file so that a kill leaves the old contents or the new, never half of them."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class JsonlLog:
    """Append-only JSONL log, flushed per record. `truncate_after` drops records past a resume point.

    Opening it cuts a torn last line (left by a kill mid-write) first, with a warning, so that new records
    do not land after half a line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            _repair_tail(self.path)
        self.file: TextIO = open(self.path, "a")

    def truncate_after(self, global_step: int) -> None:
        keep = [r for r in read_jsonl(self.path) if r.get("global_step", 0) <= global_step]
        self.file.close()
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self.file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One status line: stage, step, loss, tokens/s, ETA over all stages. Redrawn on a terminal, printed
    every `every_s` seconds otherwise (logs, CI)."""

    def __init__(
        self,
        total_steps: int,
        done_steps: int,
        stream: TextIO | None = None,
        every_s: float = 10.0,
        quiet: bool = False,
    ):
        # sys.stderr as it is now, not as it was at import (a default argument would keep a replaced one)
        stream = stream or sys.stderr
        if quiet:  # processes other than rank 0 print nothing
            stream = open(os.devnull, "w")
        self.total, self.done = total_steps, done_steps
        self.stream, self.every_s = stream, every_s
        self.tty = stream.isatty()
        self.start = time.time()
        self.start_done = done_steps
        self.last_print = 0.0

    def update(self, stage: str, step: int, stage_steps: int, loss: float, tokens_per_s: float) -> None:
        self.done += 1
        now = time.time()
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / self.total
        line = (
            f"[{pct:5.1f}%] {stage} step {step}/{stage_steps} | loss {loss:.3f} | "
            f"{tokens_per_s:,.0f} tok/s | ETA {_hms(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self.last_print >= self.every_s or self.done == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_print = now

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def count_progress(label: str, stream: TextIO | None = None, every_s: float = 10.0):
    """A `progress(done, total)` callback printing items done, rate and ETA at most every `every_s` (to
    sys.stderr as it is when called)."""
    start, last = time.time(), [0.0]
    stream = stream or sys.stderr

    def progress(done: int, total: int) -> None:
        now = time.time()
        if now - last[0] < every_s and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        stream.write(f"{label}: {done}/{total} | {rate:.1f}/s | ETA {_hms(eta)}\n")
        stream.flush()

    return progress
