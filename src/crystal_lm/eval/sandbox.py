"""Running untrusted generated programs (HumanEval, MBPP, infilling) without trusting them.

Each program runs in its own `python -I` process, in a fresh temporary folder, with a stripped environment
and limits on memory, CPU time, file size, open files and processes. Where the platform allows (Linux, as
root, with util-linux `unshare`), it also gets its own network namespace (no network), PID namespace (it
cannot see or signal other processes, and everything it started dies with it) and an unprivileged user
(`nobody`: it cannot write outside its folder and /tmp, read other processes' environments or outrun the
process limit). On timeout the whole process tree is killed.

A program *passes* only when it runs to its end: a wrapper writes a per-run random marker to a separate pipe
after the program's last statement, so `sys.exit(0)` or `os._exit(0)` before the tests is a failure. (The
marker protects against accidents and shortcuts, not against code that reads the wrapper's memory.)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "killed"]

# Runs first in the child, as trusted code: limits, privilege drop, then the program, then the marker.
# Everything lives in a function's locals so the program finds no marker in `__main__`.
_WRAPPER = """\
def _run():
    import os, resource, sys
    fd, mem, cpu, fsize, nofile, nproc, uid = (int(a) for a in sys.argv[1:8])
    marker = os.read(0, 64)
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # stdin becomes /dev/null for the program
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    sys.argv = ["program.py"]
    source = open("program.py", encoding="utf-8").read()
    namespace = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
    exec(compile(source, "program.py", "exec"), namespace)
    os.write(fd, marker)


_run()
"""

_NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64
    processes: int = 64
    output_bytes: int = 64 * 1024  # kept of stdout / stderr each


@dataclass
class SandboxResult:
    status: Status
    reason: str
    stdout: str
    stderr: str
    duration_s: float
    returncode: int | None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _namespaces_available() -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--kill-child", "true"], capture_output=True
    )
    return probe.returncode == 0


def _python_for_nobody() -> str | None:
    """An interpreter whose standard library the unprivileged user can read (a Python under /root cannot)."""
    candidates = [
        os.environ.get("CRYSTAL_SANDBOX_PYTHON"),
        sys.executable,
        "/usr/bin/python3",
        "/usr/local/bin/python3",
    ]
    for python in filter(None, candidates):
        try:
            probe = subprocess.run(
                [python, "-I", "-c", "import socket, json, math, re, collections, heapq"],
                user=_NOBODY,
                group=_NOBODY,
                extra_groups=[],
                capture_output=True,
                cwd="/",
            )
        except OSError:  # not even executable for that user
            continue
        if probe.returncode == 0:
            return python
    return None


@dataclass(frozen=True)
class Isolation:
    namespaces: bool  # own network and PID namespaces
    python: str  # interpreter that runs the programs
    unprivileged: bool  # programs run as `nobody`


_ISOLATION: Isolation | None = None


def isolation() -> Isolation:
    """What this machine allows: namespaces and a dropped uid (Linux as root), else rlimits and a process group."""
    global _ISOLATION
    if _ISOLATION is None:
        namespaces = _namespaces_available()
        python = _python_for_nobody() if namespaces else None
        _ISOLATION = Isolation(namespaces, python or sys.executable, python is not None)
    return _ISOLATION


def isolation_available() -> bool:
    iso = isolation()
    return iso.namespaces and iso.unprivileged


def _describe_exit(returncode: int, stderr: str, limits: Limits) -> tuple[Status, str]:
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig == signal.SIGXCPU:
            return "killed", "CPU time limit"
        if sig == signal.SIGXFSZ:
            return "killed", f"file size limit ({limits.file_size_mb} MB; output flood?)"
        return "killed", f"killed by {sig.name}"
    tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "MemoryError" in tail:
        return "failed", f"memory limit ({limits.memory_mb} MB): {tail}"
    if returncode == 0:
        return "failed", "exited before the program completed (no completion marker)"
    return "failed", tail or f"exit status {returncode}"


def run(source: str, timeout_s: float = 10.0, limits: Limits | None = None) -> SandboxResult:
    """Execute one program; `passed` only if it ran to its last statement within the limits."""
    limits = limits or Limits()
    iso = isolation()
    workdir = Path(tempfile.mkdtemp(prefix="crystal-sandbox-"))
    try:
        (workdir / "program.py").write_text(source, encoding="utf-8")
        (workdir / "wrapper.py").write_text(_WRAPPER)
        if iso.unprivileged:
            os.chown(workdir, _NOBODY, _NOBODY)
            for f in workdir.iterdir():
                os.chown(f, _NOBODY, _NOBODY)
        marker = secrets.token_hex(16).encode()
        done_r, done_w = os.pipe()
        stdout_f = open(workdir / ".stdout", "w+b")  # files, not pipes: a flood cannot block us
        stderr_f = open(workdir / ".stderr", "w+b")
        args = (
            done_w,
            limits.memory_mb * 2**20,
            int(timeout_s) + 1,
            limits.file_size_mb * 2**20,
            limits.open_files,
            limits.processes,
            _NOBODY if iso.unprivileged else -1,
        )
        cmd = [iso.python, "-I", "-B", "wrapper.py", *map(str, args)]
        if iso.namespaces:
            cmd = ["unshare", "--net", "--pid", "--fork", "--kill-child", *cmd]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)}
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=stdout_f,
            stderr=stderr_f,
            pass_fds=(done_w,),
            start_new_session=True,
        )
        os.close(done_w)
        try:
            proc.stdin.write(marker)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # The whole tree: its process group (and, with namespaces, everything in its PID namespace).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        duration = time.monotonic() - start
        os.set_blocking(done_r, False)
        try:
            got = os.read(done_r, 64)
        except BlockingIOError:
            got = b""
        os.close(done_r)
        stdout_f.seek(0)
        stderr_f.seek(0)
        out = stdout_f.read(limits.output_bytes).decode("utf-8", "replace")
        err = stderr_f.read(limits.output_bytes).decode("utf-8", "replace")
        stdout_f.close()
        stderr_f.close()
        if timed_out:
            return SandboxResult("timeout", f"exceeded {timeout_s:g}s", out, err, duration, None)
        if got == marker:
            return SandboxResult("passed", "completed", out, err, duration, proc.returncode)
        status, reason = _describe_exit(proc.returncode, err, limits)
        return SandboxResult(status, reason, out, err, duration, proc.returncode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(
    sources: Iterable[str], timeout_s: float = 10.0, workers: int | None = None, limits: Limits | None = None
) -> list[SandboxResult]:
    """Run programs in parallel (one process each, `workers` at a time; default: one per core)."""
    sources = list(sources)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run(s, timeout_s, limits), sources))
