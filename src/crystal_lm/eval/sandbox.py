"""Running untrusted generated programs (HumanEval, MBPP, infilling) without trusting them.

Each program runs in its own `python -I` process with a stripped environment and limits on memory, CPU time,
file size, open files and processes; on timeout the whole process tree is killed. Where the platform allows
(Linux, as root, with util-linux `unshare` and `setpriv`) -- see `isolation()` -- each program also gets:

* its own network namespace (no network) and PID namespace (it cannot see or signal other processes, including
  the other sandboxes, and everything it started dies with it -- and with the evaluator: `unshare` runs under
  `setpriv --pdeathsig KILL`, so it dies with the evaluating thread, and the program's process, the namespace's
  first, dies with `unshare` (`--kill-child`; the wrapper sets that signal again after its setuid cleared it,
  and runs nothing if the evaluator went before);
* its own unprivileged uid/gid, taken from a pool (`_UID_BASE` + slot; the ids need not exist in /etc/passwd)
  that never hands one id to two programs at once, in this process (a lock) or in other processes on the machine
  (an `flock` per slot under /run/crystal-sandbox). So programs running side by side (`run_many`) cannot
  write to each other's files, and a fork bomb in one uses up only its own process limit (RLIMIT_NPROC counts
  per uid). A slot is handed back only once no process of its uid is left, and a uid that some process on the
  machine still runs as (say, one left by an evaluator killed before this was so) is never handed out.
* its own mount namespace with fresh, size-capped tmpfs on /tmp, /var/tmp and /dev/shm: its folder is
  /tmp/sandbox in there (mode 0700, owned by its uid; the program and wrapper are copied in from a root-only
  host folder), and whatever it writes to those places vanishes with it. If mounting is not allowed but the
  other namespaces are, the folder is a host temporary folder chmod 0700 owned by the uid, and files that uid
  left at the top of /tmp, /var/tmp and /dev/shm are removed after the run.

Without namespaces (not root, not Linux) only the rlimits, the stripped environment and a process-group kill
apply: programs then run as the calling user and can reach each other's files, and while the program itself
dies with the evaluator (on Linux), processes it started in a session of their own may outlive both.

A program *passes* only when it runs to its end: the random per-run marker waits, unread, in a pipe on fd 1000;
the wrapper (trusted code in the same process) reads it only after the program's last statement has run, and
copies it to the completion pipe on fd 1001, which the parent checks. So `sys.exit(0)`, `os._exit(0)`, an
`atexit` hook or a killed process is a failure, and while the program runs the marker is in no Python object
and no reachable frame holds either fd number (so `sys._getframe(1).f_locals` or a traceback's `tb_frame`
finds nothing). What is *not* guaranteed: the program runs in the wrapper's process, so code that sets out to
forge completion can still do it -- e.g. find the fds in /proc/self/fd (or the wrapper's code constants), read
fd 1000 and write what it read to fd 1001. The marker guards against accidents and shortcuts, not against a
program written to cheat; the isolation above is what keeps a hostile program from harming the machine or
other programs' results.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)
Status = Literal["passed", "failed", "timeout", "killed"]

# Runs first in the child, as trusted code: limits, privilege drop, then the program, then the marker.
# The marker pipe (stdin) and the completion pipe are moved to the fixed fds 1000 / 1001 and the marker is read
# only after exec returns: no variable holds the marker or an fd number while the program runs.
_WRAPPER = """\
def _setup():
    import ctypes, os, resource, sys
    done, alive, mem, cpu, fsize, nofile, nproc, uid = (int(a) for a in sys.argv[1:9])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1002:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1002, max(hard, 1002)))
    os.dup2(0, 1000, inheritable=False)
    os.dup2(done, 1001, inheritable=False)
    os.close(done)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # stdin becomes /dev/null for the program
    os.close(null)
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
    # Die with the parent (unshare, which dies with the evaluator): setuid cleared that signal, so set it again,
    # then see that the evaluator did not go before it was set (its end of the `alive` pipe is then closed).
    if sys.platform.startswith("linux") and ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG, SIGKILL)")
    os.set_blocking(alive, False)
    try:
        evaluator_gone = os.read(alive, 1) == b""
    except BlockingIOError:  # nothing to read and the write end open: the evaluator is there
        evaluator_gone = False
    if evaluator_gone:
        os._exit(1)
    os.close(alive)
    sys.argv = ["program.py"]


_setup()
del _setup
with open("program.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "program.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
import os as _os

_os.write(1001, _os.read(1000, 64))
"""

# Runs as root inside the new mount namespace, in the root-only host folder, before the wrapper: fresh tmpfs on
# the world-writable places (hiding the host's), the program's folder in there, owned by its uid.
_PRIVATE_TMP = """\
set -e
uid=$1
size=$2
shift 2
for d in /tmp /var/tmp /dev/shm; do
    if [ -d "$d" ]; then
        mount -t tmpfs -o "mode=1777,nosuid,nodev,size=${size}m,nr_inodes=4096" tmpfs "$d"
    fi
done
mkdir -m 700 /tmp/sandbox
cp wrapper.py program.py /tmp/sandbox/
chown -R "$uid:$uid" /tmp/sandbox
cd /tmp/sandbox
exec "$@"
"""

# Prefix of the sandbox's `unshare`: it dies (SIGKILL) when the evaluating thread does, and with it (its
# --kill-child) the program's PID namespace, everything the program started included.
_DIES_WITH_EVALUATOR = ("setpriv", "--pdeathsig", "KILL")
_UID_BASE = 2_000_000_000  # programs run as _UID_BASE + slot (gid the same): ids no account uses
_UID_SLOTS = 4096
_SLOT_LOCK_DIR = "/run/crystal-sandbox"
_SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")


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


def _runs(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _death_prefix() -> tuple[str, ...]:
    """`setpriv --pdeathsig KILL` where util-linux has it (then `unshare` dies with the evaluating thread);
    else nothing, and a program may outlive an evaluator killed with SIGKILL."""
    if shutil.which("setpriv") is not None and _runs([*_DIES_WITH_EVALUATOR, "true"]):
        return _DIES_WITH_EVALUATOR
    return ()


def _unshare_works(prefix: tuple[str, ...], *args: str) -> bool:
    return _runs([*prefix, "unshare", *args])


def _namespaces_available(prefix: tuple[str, ...]) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return _unshare_works(prefix, "--net", "--pid", "--fork", "--kill-child", "true")


def _private_tmp_available(prefix: tuple[str, ...]) -> bool:
    return _unshare_works(
        prefix,
        "--mount", "--propagation", "private", "--net", "--pid", "--fork", "--kill-child",
        "/bin/sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp",
    )  # fmt: skip


def _python_for_sandbox_uid() -> str | None:
    """An interpreter whose standard library a pool uid can read (a Python under /root cannot).

    Every pool uid is a stranger to every file (no account, no groups), so what one of them may read, all may."""
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
                user=_UID_BASE,
                group=_UID_BASE,
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
    unprivileged: bool  # programs run as their own pool uid
    private_tmp: bool = False  # own mount namespace with fresh /tmp, /var/tmp, /dev/shm
    death_prefix: tuple[str, ...] = ()  # runs `unshare` so that it dies with the evaluator (setpriv)


_ISOLATION: Isolation | None = None


def isolation() -> Isolation:
    """What this machine allows: namespaces and a pool uid (Linux as root), else rlimits and a process group."""
    global _ISOLATION
    if _ISOLATION is None:
        prefix = _death_prefix() if sys.platform.startswith("linux") else ()
        namespaces = _namespaces_available(prefix)
        python = _python_for_sandbox_uid() if namespaces else None
        private_tmp = python is not None and _private_tmp_available(prefix)
        _ISOLATION = Isolation(namespaces, python or sys.executable, python is not None, private_tmp, prefix)
        if namespaces and not prefix:
            log.warning(
                "sandbox: util-linux `setpriv --pdeathsig` is not available; programs run isolated, but one "
                "may outlive an evaluator killed with SIGKILL (install util-linux's setpriv)"
            )
        elif not namespaces and hasattr(os, "geteuid") and os.geteuid() == 0:
            log.warning(
                "sandbox: running as root without `unshare` namespaces: programs run as root with only "
                "rlimits around them (install util-linux)"
            )
    return _ISOLATION


def isolation_available() -> bool:
    iso = isolation()
    return iso.namespaces and iso.unprivileged


class _UidPool:
    """Hands out `_UID_BASE + slot`, never the same slot twice at once: a lock between this process's threads,
    an exclusive `flock` on a per-slot file between processes (best effort: only where the lock folder works)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_use: set[int] = set()
        self._lock_dir: str | None = None
        self._looked = False

    def _dir(self) -> str | None:
        if not self._looked:
            self._looked = True
            try:
                os.makedirs(_SLOT_LOCK_DIR, mode=0o700, exist_ok=True)
                st = os.lstat(_SLOT_LOCK_DIR)
                ok = os.path.isdir(_SLOT_LOCK_DIR) and not os.path.islink(_SLOT_LOCK_DIR) and st.st_uid == 0
                self._lock_dir = _SLOT_LOCK_DIR if ok else None
            except OSError:
                self._lock_dir = None
        return self._lock_dir

    def acquire(self) -> tuple[int, int | None]:
        with self._lock:
            lock_dir = self._dir()
            # A uid some process still runs as is not free whatever the locks say: e.g. one left by an
            # evaluator killed before its program ended (its flock went with it), which would use up the next
            # program's process limit (RLIMIT_NPROC counts per uid).
            occupied = _pool_uids_with_processes()
            for slot in range(_UID_SLOTS):
                if slot in self._in_use or _UID_BASE + slot in occupied:
                    continue
                fd = None
                if lock_dir is not None:
                    try:
                        fd = os.open(f"{lock_dir}/slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                    except OSError:
                        fd = None
                    else:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except OSError:  # another process has it
                            os.close(fd)
                            continue
                self._in_use.add(slot)
                return slot, fd
        raise RuntimeError(f"all {_UID_SLOTS} sandbox uids are in use")

    def release(self, slot: int, fd: int | None) -> None:
        with self._lock:
            if fd is not None:
                os.close(fd)  # drops the flock
            self._in_use.discard(slot)


_POOL = _UidPool()


def _pool_uids_with_processes() -> set[int]:
    """The pool uids that a process on this machine runs as (real, effective, saved or filesystem uid)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uids = map(int, line.split()[1:])
                        found.update(u for u in uids if _UID_BASE <= u < _UID_BASE + _UID_SLOTS)
                        break
        except OSError:  # gone meanwhile
            continue
    return found


def _processes_of(uid: int) -> bool:
    return uid in _pool_uids_with_processes()


def _remove_files_of(uid: int) -> None:
    """Without a private /tmp: what the uid left at the top of the shared world-writable folders."""
    for top in _SHARED_TMP:
        with contextlib.suppress(OSError):
            for entry in os.scandir(top):
                try:
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                except OSError:
                    continue


@contextlib.contextmanager
def _sandbox_uid(iso: Isolation) -> Iterator[int]:
    """A pool uid for one run (-1: no privilege drop here); back to the pool once nothing of it is left."""
    if not iso.unprivileged:
        yield -1
        return
    slot, fd = _POOL.acquire()
    uid = _UID_BASE + slot
    try:
        yield uid
    finally:
        deadline = time.monotonic() + 5
        while _processes_of(uid) and time.monotonic() < deadline:  # a PID namespace dies after its init
            time.sleep(0.01)
        if not _processes_of(uid):  # never hand out a uid that still has processes: else the slot stays taken
            if not iso.private_tmp:
                _remove_files_of(uid)
            _POOL.release(slot, fd)


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
    with _sandbox_uid(iso) as uid:
        return _run(source, timeout_s, limits, iso, uid)


def _run(source: str, timeout_s: float, limits: Limits, iso: Isolation, uid: int) -> SandboxResult:
    workdir = Path(tempfile.mkdtemp(prefix="crystal-sandbox-"))  # mode 0700
    try:
        (workdir / "program.py").write_text(source, encoding="utf-8")
        (workdir / "wrapper.py").write_text(_WRAPPER)
        private_tmp = iso.private_tmp and uid >= 0
        if uid >= 0 and not private_tmp:  # the program works in this folder: its uid's, nobody else's
            for path in (workdir, *workdir.iterdir()):
                os.chown(path, uid, uid)
        marker = secrets.token_hex(16).encode()
        marker_r, marker_w = os.pipe()  # the marker waits here, unread, until the program has ended
        os.write(marker_w, marker)
        os.close(marker_w)
        done_r, done_w = os.pipe()
        # Only we hold the write end (not inheritable), for as long as the run lasts: when the wrapper finds it
        # closed, we are gone (see _WRAPPER).
        alive_r, alive_w = os.pipe()
        stdout_f = open(workdir / ".stdout", "w+b")  # files, not pipes: a flood cannot block us
        stderr_f = open(workdir / ".stderr", "w+b")
        args = (
            done_w,
            alive_r,
            limits.memory_mb * 2**20,
            int(timeout_s) + 1,
            limits.file_size_mb * 2**20,
            limits.open_files,
            limits.processes,
            uid,
        )
        cmd = [iso.python, "-I", "-B", "wrapper.py", *map(str, args)]
        home = str(workdir)
        tmp = str(workdir)
        if iso.namespaces:
            if private_tmp:
                tmpfs_mb = max(4 * limits.file_size_mb, 16)
                cmd = ["/bin/sh", "-c", _PRIVATE_TMP, "sh", str(uid), str(tmpfs_mb), *cmd]
                cmd = ["unshare", "--mount", "--propagation", "private", *cmd]
                home, tmp = "/tmp/sandbox", "/tmp"
            cmd = [*iso.death_prefix, "unshare", "--net", "--pid", "--fork", "--kill-child", *cmd]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": tmp}
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdin=marker_r,
                stdout=stdout_f,
                stderr=stderr_f,
                pass_fds=(done_w, alive_r),
                start_new_session=True,
            )
        except BaseException:
            os.close(alive_w)
            raise
        finally:
            os.close(marker_r)
            os.close(done_w)
            os.close(alive_r)
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
            os.close(alive_w)
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
    """Run programs in parallel (one process each, `workers` at a time; default: one per core).

    Each running program has its own uid from the pool (see the module docstring)."""
    sources = list(sources)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run(s, timeout_s, limits), sources))
