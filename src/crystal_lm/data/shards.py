"""Packed token shards: documents become `<s> … </s>`, concatenated across document boundaries and cut into
windows of `seq_len + 1` tokens with stride `seq_len` (Crystal's 1-token overlap: inputs w[:L], labels w[1:]).

A shard directory holds `shard-NNNNN.bin` files (raw little-endian uint16/uint32 arrays of shape
[n, seq_len + 1], read through memory maps), `documents.jsonl` (each document's id, first token offset and
length in the packed stream) and `index.json` (tokenizer hash, shapes, per-shard sha256). The last window is
padded with EOS and records how many of its tokens are real (Crystal's `write_remainder`: pad masked out).
Shards are written to a temporary folder and renamed, so a half-written build is never used; on open, sizes
and hashes are checked and a tokenizer other than the one the shards were made with is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal_lm.files import sha256_file

FORMAT_VERSION = 2


class ShardError(RuntimeError):
    pass


# What `ShardSet` reads from an index and from each of its shards.
_INDEX_KEYS = ("format_version", "tokenizer_sha256", "seq_len", "dtype", "n_tokens", "shards")
_SHARD_KEYS = ("file", "bytes", "sha256", "n_samples", "last_valid")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class ShardWriter:
    """Streams tokenized documents into packed windows, `rows_per_shard` windows per file."""

    def __init__(
        self,
        out_dir: Path,
        seq_len: int,
        dtype: np.dtype,
        bos_id: int,
        eos_id: int,
        tokenizer_sha256: str,
        rows_per_shard: int = 65536,
    ) -> None:
        self.final_dir = Path(out_dir)
        self.dir = self.final_dir.with_name(self.final_dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.seq_len, self.dtype, self.bos_id, self.eos_id = seq_len, dtype, bos_id, eos_id
        self.tokenizer_sha256 = tokenizer_sha256
        self.rows_per_shard = rows_per_shard
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        # The shard file being written: rows go straight to disk (memory stays bounded), hashed as they go.
        self._file = None
        self._hash = hashlib.sha256()
        self._rows_in_file = self._bytes_in_file = 0
        self.docs_file = open(self.dir / "documents.jsonl", "w")
        self.n_docs = 0
        self.n_tokens = 0
        self.last_valid = seq_len + 1

    def add(self, doc_id: str, ids: list[int]) -> None:
        tokens = np.empty(len(ids) + 2, dtype=self.dtype)
        tokens[0], tokens[-1] = self.bos_id, self.eos_id
        tokens[1:-1] = ids
        self.docs_file.write(json.dumps({"id": doc_id, "start": self.n_tokens, "tokens": len(tokens)}) + "\n")
        self.n_docs += 1
        self.n_tokens += len(tokens)
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self._emit_windows(final=False)

    def _emit_windows(self, final: bool) -> None:
        L = self.seq_len
        if self.buffered < L + 1 and not final:
            return
        stream = np.concatenate(self.buffer) if self.buffer else np.empty(0, dtype=self.dtype)
        n_full = (len(stream) - 1) // L if len(stream) > L else 0
        if n_full:
            self._write_rows(np.stack([stream[i * L : i * L + L + 1] for i in range(n_full)]))
        rest = stream[n_full * L :]  # the last token of a window is also the first of the next
        if final and len(rest) > 1:
            row = np.full((1, L + 1), self.eos_id, dtype=self.dtype)
            row[0, : len(rest)] = rest
            self._write_rows(row)
            self.last_valid = len(rest)
            rest = rest[:0]
        self.buffer, self.buffered = [rest.copy()], len(rest)
        if final and self._file is not None:
            self._close_file()

    def _write_rows(self, rows: np.ndarray) -> None:
        i = 0
        while i < len(rows):
            if self._file is None:
                self._file = open(self.dir / f"shard-{len(self.shards):05d}.bin", "wb")
                self._hash, self._rows_in_file, self._bytes_in_file = hashlib.sha256(), 0, 0
            take = min(len(rows) - i, self.rows_per_shard - self._rows_in_file)
            data = rows[i : i + take].astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._rows_in_file += take
            self._bytes_in_file += len(data)
            i += take
            if self._rows_in_file == self.rows_per_shard:
                self._close_file()

    def _close_file(self) -> None:
        assert self._file is not None
        self._file.close()
        self.shards.append(
            {
                "file": Path(self._file.name).name,
                "n_samples": self._rows_in_file,
                "bytes": self._bytes_in_file,
                "sha256": self._hash.hexdigest(),
                "last_valid": self.seq_len + 1,
            }
        )
        self._file = None

    def close(self, extra: dict | None = None) -> Path:
        self._emit_windows(final=True)
        if self.shards:  # only the stream's last window can be padded
            self.shards[-1]["last_valid"] = self.last_valid
        self.docs_file.close()
        index = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": self.tokenizer_sha256,
            "seq_len": self.seq_len,
            "dtype": self.dtype.str,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "n_samples": sum(s["n_samples"] for s in self.shards),
            "n_documents": self.n_docs,
            "n_tokens": self.n_tokens,
            "shards": self.shards,
            **(extra or {}),
        }
        (self.dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        shutil.rmtree(self.final_dir, ignore_errors=True)
        os.replace(self.dir, self.final_dir)
        return self.final_dir


@dataclass
class Window:
    tokens: np.ndarray  # [seq_len + 1]
    valid: int  # real tokens at the front (the rest is EOS padding)


class ShardSet:
    """Read-only view of a shard directory; `window(i)` is the i-th packed sample."""

    def __init__(
        self, directory: str | Path, expect_tokenizer: str | None = None, verify: bool = True
    ) -> None:
        self.dir = Path(directory)
        index_path = self.dir / "index.json"
        if not index_path.is_file():
            raise ShardError(f"{self.dir}: no index.json (not a shard directory, or an unfinished build)")
        rebuild = f"delete {self.dir} and run `crystal data prepare` again to rebuild it"
        try:
            self.index = json.loads(index_path.read_text())
        except (OSError, ValueError) as exc:
            raise ShardError(f"{index_path}: unreadable shard index ({exc}); {rebuild}") from None
        missing = [k for k in _INDEX_KEYS if not isinstance(self.index, dict) or k not in self.index]
        if missing:
            raise ShardError(f"{index_path}: not a complete shard index (no {', '.join(missing)}); {rebuild}")
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{index_path}: format version {self.index.get('format_version')} is not "
                f"{FORMAT_VERSION}; rebuild the shards"
            )
        if expect_tokenizer is not None and self.index["tokenizer_sha256"] != expect_tokenizer:
            raise ShardError(
                f"{self.dir}: made with tokenizer {self.index['tokenizer_sha256'][:16]}…, but this "
                f"run uses tokenizer {expect_tokenizer[:16]}…; rebuild the shards with it"
            )
        self.seq_len = self.index["seq_len"]
        dtype = np.dtype(self.index["dtype"])
        self.maps: list[np.ndarray] = []
        self.offsets = [0]
        self.last_valid: list[int] = []
        for k, shard in enumerate(self.index["shards"]):
            if not isinstance(shard, dict) or any(key not in shard for key in _SHARD_KEYS):
                raise ShardError(
                    f"{index_path}: shards[{k}] lacks one of {', '.join(_SHARD_KEYS)}; {rebuild}"
                )
            path = self.dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise ShardError(f"{path}: missing or truncated (expected {shard['bytes']} bytes); {rebuild}")
            if verify:
                digest = sha256_file(path)
                if digest != shard["sha256"]:
                    raise ShardError(
                        f"{path}: sha256 {digest[:16]}… does not match the index "
                        f"({shard['sha256'][:16]}…): the shard is corrupt; {rebuild}"
                    )
            self.maps.append(
                np.memmap(path, dtype=dtype, mode="r", shape=(shard["n_samples"], self.seq_len + 1))
            )
            self.offsets.append(self.offsets[-1] + shard["n_samples"])
            self.last_valid.append(shard["last_valid"])

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def n_tokens(self) -> int:
        return self.index["n_tokens"]

    def window(self, i: int) -> Window:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.dir} ({len(self)} samples)")
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        tokens = np.asarray(self.maps[s][i - self.offsets[s]], dtype=np.int64)
        return Window(tokens, self.valid(i, s))

    def valid(self, i: int, shard: int | None = None) -> int:
        """Real tokens of window i: all L + 1, except the padded last window of a packed stream (a unit)."""
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1 if shard is None else shard
        return self.last_valid[s] if i == self.offsets[s + 1] - 1 else self.seq_len + 1

    def documents(self) -> Iterable[dict]:
        with open(self.dir / "documents.jsonl") as f:
            for line in f:
                yield json.loads(line)
