"""The sandbox against hostile programs: each is contained, scored as failed with its reason, and the
evaluation carries on."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crystal_lm.eval import sandbox
from crystal_lm.eval.sandbox import Limits, isolation_available, run, run_many

ISOLATED = isolation_available()
needs_isolation = pytest.mark.skipif(
    not ISOLATED, reason="needs Linux namespaces and root (util-linux unshare); CI machines have both"
)


def test_completing_program_passes_and_exit_codes_do_not():
    assert run("x = 1\nassert x == 1\nprint('ok')\n", 5).status == "passed"
    early = run("import sys\nsys.exit(0)\nassert False\n", 5)
    assert early.status == "failed" and "before the program completed" in early.reason
    hard = run("import os\nos._exit(0)\n", 5)
    assert hard.status == "failed"
    wrong = run("assert 1 == 2, 'nope'\n", 5)
    assert wrong.status == "failed" and "AssertionError: nope" in wrong.reason


def test_marker_is_not_in_main():
    r = run(
        "import __main__, os\nassert not hasattr(__main__, 'marker')\nos.write(3, b'x' * 32)\nos._exit(0)\n",
        5,
    )
    assert r.status == "failed"


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout" and time.monotonic() - t0 < 5


def test_memory_hog_is_stopped():
    r = run("x = bytearray(4 * 1024**3)\n", 5, Limits(memory_mb=512))
    assert r.status == "failed" and "memory limit" in r.reason


def test_output_flood_is_capped():
    r = run("import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n", 10, Limits(file_size_mb=4))
    assert r.status in ("killed", "failed") and len(r.stdout) <= Limits().output_bytes
    assert "file size limit" in r.reason or r.status == "failed"


@needs_isolation
def test_daemon_dies_with_the_program():
    token = secrets.token_hex(8)  # the daemon's command line, to look for it from here
    code = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"  # its own session: a process-group kill would miss it
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {token!r}])\n"
        "time.sleep(0.5)\n"
        "assert os.waitpid(pid, os.WNOHANG) == (0, 0), 'the daemon did not start'\n"
    )
    r = run(code, 5)
    assert r.status == "passed", r.reason
    time.sleep(0.5)
    survivors = []
    for entry in Path("/proc").iterdir():
        try:
            if token.encode() in (entry / "cmdline").read_bytes():
                survivors.append(entry.name)
        except OSError:
            continue
    assert not survivors  # it ran, and died with the program


@needs_isolation
def test_fork_bomb_is_contained():
    t0 = time.monotonic()
    r = run("import os\nwhile True:\n    os.fork()\n", timeout_s=3)
    assert r.status in ("failed", "timeout", "killed") and time.monotonic() - t0 < 15
    assert run("print('the machine still works')\n", 5).status == "passed"


@needs_isolation
def test_no_network():
    code = "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', 22))\n"
    r = run(code, 5)
    assert r.status == "failed" and ("Network is unreachable" in r.reason or "refused" in r.reason)


@needs_isolation
def test_cannot_write_outside_its_folder(tmp_path):
    os.chmod(tmp_path, 0o777)  # even a folder anyone may write: the host's /tmp is not the program's
    for target in (tmp_path / "owned.txt", Path("/") / f"crystal-owned-{secrets.token_hex(4)}.txt"):
        r = run(f"open({str(target)!r}, 'w').write('x')\n", 5)
        assert r.status == "failed" and not target.exists()
        assert "Permission" in r.reason or "No such file" in r.reason, r.reason


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("CRYSTAL_SECRET_TOKEN", "hunter2")
    r = run("import os\nassert 'CRYSTAL_SECRET_TOKEN' not in os.environ\nprint(sorted(os.environ))\n", 5)
    assert r.status == "passed" and "CRYSTAL_SECRET_TOKEN" not in r.stdout
    parent = run(f"print(open('/proc/{os.getpid()}/environ', 'rb').read())\n", 5)
    assert "hunter2" not in parent.stdout


@needs_isolation  # without a PID namespace the program runs as our user: it could kill pytest
def test_cannot_kill_its_parent():
    r = run(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n", 5)
    assert r.status == "failed"  # and we are still here to assert it


def test_hostile_batch_runs_in_parallel_and_evaluation_carries_on():
    programs = [
        "while True: pass\n",
        "assert True\n",
        "x = bytearray(2**33)\n",
        "raise SystemExit(0)\n",
        "print('fine')\n",
    ]
    results = run_many(programs, timeout_s=2, workers=2, limits=Limits(memory_mb=512))
    assert [r.status for r in results] == ["timeout", "passed", "failed", "failed", "passed"]


def test_python_is_isolated_mode():
    r = run("import sys\nassert sys.flags.isolated == 1\nassert sys.executable\n", 5)
    assert r.passed, r.reason
    assert sandbox.sys is sys


# A program can reach the wrapper's frames; the marker and the fds must not be there to find.
FRAME_LOCALS_FORGERY = (
    "import os, sys\nf = sys._getframe(1)\nos.write(f.f_locals['fd'], f.f_locals['marker'])\nos._exit(1)\n"
)
TRACEBACK_FORGERY = (
    "import os\n"
    "try:\n"
    "    raise Exception\n"
    "except Exception as e:\n"
    "    frame = e.__traceback__.tb_frame.f_back\n"
    "os.write(frame.f_locals['fd'], frame.f_locals['marker'])\n"
    "os._exit(1)\n"
)
FRAME_SCAN_FORGERY = (  # anything marker-like in any reachable frame, written to any fd
    "import os, sys\n"
    "f = sys._getframe(0)\n"
    "found = []\n"
    "while f is not None:\n"
    "    for v in list(f.f_locals.values()) + list(f.f_globals.values()):\n"
    "        if isinstance(v, (bytes, str)) and len(v) == 32:\n"
    "            found.append(v.encode() if isinstance(v, str) else v)\n"
    "    f = f.f_back\n"
    "for fd in range(3, 64):\n"
    "    for m in found:\n"
    "        try:\n"
    "            os.write(fd, m)\n"
    "        except OSError:\n"
    "            pass\n"
    "os._exit(1)\n"
)


@pytest.mark.parametrize(
    "attack",
    [FRAME_LOCALS_FORGERY, TRACEBACK_FORGERY, FRAME_SCAN_FORGERY],
    ids=["f_locals", "traceback", "scan"],
)
def test_marker_cannot_be_taken_from_the_wrappers_frames(attack):
    r = run(attack, 5)
    assert r.status == "failed", r.reason


@needs_isolation
def test_concurrent_programs_get_their_own_uids():
    code = "import os, time\nprint(os.getuid(), os.getgid())\ntime.sleep(0.5)\n"
    results = run_many([code] * 4, timeout_s=5, workers=4)
    assert all(r.passed for r in results), [r.reason for r in results]
    ids = [tuple(map(int, r.stdout.split())) for r in results]
    assert len({uid for uid, _ in ids}) == 4
    assert all(uid == gid and uid not in (0, 65534) for uid, gid in ids)


@needs_isolation
def test_concurrent_programs_cannot_modify_each_others_files():
    writer = (
        "import glob, os, time\n"
        "mine = os.path.realpath(os.getcwd())\n"
        "patterns = ['/tmp/crystal-sandbox-*/program.py', '/tmp/*/program.py', '/var/tmp/*/program.py',\n"
        "            '/proc/*/cwd/program.py', '/proc/*/root/tmp/*/program.py']\n"
        "t = time.time()\n"
        "while time.time() - t < 2:\n"
        "    for p in patterns:\n"
        "        for path in glob.glob(p):\n"
        "            if os.path.realpath(os.path.dirname(path)) == mine:\n"
        "                continue\n"
        "            try:\n"
        "                with open(path, 'w') as f:\n"
        "                    f.write('pass\\n')\n"
        "            except OSError:\n"
        "                pass\n"
        "assert False, 'the writer fails too'\n"
    )
    wrong = "import time\ntime.sleep(0.3)\nassert False, 'wrong answer'\n"
    results = run_many([writer] + [wrong] * 6, timeout_s=6, workers=3)
    assert [r.status for r in results] == ["failed"] * 7, [r.reason for r in results]
    assert all("AssertionError" in r.reason for r in results)


@needs_isolation
def test_fork_bomb_neighbour_does_not_make_a_correct_program_fail():
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
    good = (
        "import threading, time\n"
        "time.sleep(0.5)\n"
        "t = threading.Thread(target=lambda: None)\n"
        "t.start()\n"
        "t.join()\n"
        "assert sum(range(4)) == 6\n"
    )
    results = run_many([bomb, good], timeout_s=4, workers=2)
    assert results[0].status in ("failed", "timeout", "killed")
    assert results[1].status == "passed", results[1].reason


@needs_isolation
def test_files_written_to_tmp_do_not_survive_the_run():
    name = f"crystal-sandbox-leftover-{secrets.token_hex(4)}"
    places = [Path(d) / name for d in ("/tmp", "/var/tmp", "/dev/shm") if Path(d).is_dir()]
    code = "".join(f"open({str(p)!r}, 'w').write('x')\n" for p in places)
    code += "".join(f"os.makedirs({str(p) + '-dir/sub'!r})\n" for p in places)
    r = run("import os\n" + code, 5)
    assert r.status == "passed", r.reason
    for p in places:
        assert not p.exists() and not Path(str(p) + "-dir").exists()


def _processes_with(token: str) -> dict[int, int]:
    """Live (not zombie) processes whose command line holds `token`: pid -> parent pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if token.encode() not in (entry / "cmdline").read_bytes():
                continue
            status = dict(
                line.split(":\t", 1) for line in (entry / "status").read_text().splitlines() if ":\t" in line
            )
        except OSError:  # gone meanwhile
            continue
        if not status["State"].startswith("Z"):
            found[int(entry.name)] = int(status["PPid"])
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_isolation
def test_programs_die_with_a_killed_evaluator():
    """`kill -9` of the evaluating process: its program, and what the program started (even in a session of its
    own), go too. (setuid cleared the parent-death signal, and nothing killed the tree: they ran on, for good.)"""
    token = secrets.token_hex(8)
    program = (
        "import subprocess, sys, time\n"
        "for _ in range(2):\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {token!r}],\n"
        "                     start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    evaluator = subprocess.Popen(
        [sys.executable, "-c", f"from crystal_lm.eval.sandbox import run; run({program!r}, 600)"]
    )
    program_pid = None
    try:
        deadline = time.monotonic() + 60
        started: dict[int, int] = {}
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            started = {p: pp for p, pp in _processes_with(token).items() if p != evaluator.pid}
        assert len(started) == 2, "the program did not start its children"
        program_pid = next(iter(started.values()))  # the children's parent: the program itself
        evaluator.kill()
        evaluator.wait()
        watched = [*started, program_pid]
        deadline = time.monotonic() + 30
        while any(map(_alive, watched)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, watched)), "the sandboxed programs outlived their evaluator"
    finally:
        evaluator.kill()
        evaluator.wait()
        for pid in [*_processes_with(token), *([program_pid] if program_pid else [])]:  # left if it failed
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@needs_isolation
def test_a_uid_that_still_has_processes_is_not_handed_out():
    """Processes of a pool uid left by another evaluator (one killed before the fix, or a program that cleared its
    parent-death signal): the uid goes to no new program, whose process limit they would use up."""
    slot, fd = sandbox._POOL.acquire()  # the slot the next run would get
    sandbox._POOL.release(slot, fd)
    orphan_uid = sandbox._UID_BASE + slot
    orphan = subprocess.Popen(["sleep", "600"], user=orphan_uid, group=orphan_uid, extra_groups=[])
    try:
        r = run("import os\nprint(os.getuid())\n", 5)
        assert r.passed, r.reason
        assert int(r.stdout) != orphan_uid
    finally:
        orphan.kill()
        orphan.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_the_program_does_not_start_once_its_evaluator_is_gone(tmp_path):
    """The evaluator died before the wrapper could set its parent-death signal again (so that no signal would
    come): the wrapper sees the evaluator's end of its pipe closed and does not run the program."""
    (tmp_path / "wrapper.py").write_text(sandbox._WRAPPER)
    ran = tmp_path / "ran"
    (tmp_path / "program.py").write_text(f"open({str(ran)!r}, 'w').write('x')\n")
    marker_r, marker_w = os.pipe()
    os.write(marker_w, b"m" * 32)
    os.close(marker_w)
    done_r, done_w = os.pipe()
    alive_r, alive_w = os.pipe()

    def wrapper(alive: int) -> subprocess.CompletedProcess:
        limits = (2**30, 10, 2**20, 64, 64, -1)  # memory, CPU s, file size, open files, processes, no setuid
        return subprocess.run(
            [sys.executable, "-I", "-B", "wrapper.py", str(done_w), str(alive), *map(str, limits)],
            cwd=tmp_path,
            stdin=marker_r,
            pass_fds=(done_w, alive),
            capture_output=True,
        )

    try:
        assert wrapper(alive_r).returncode == 0 and ran.exists()  # evaluator there: the program runs
        ran.unlink()
        os.close(alive_w)  # the evaluator gone
        assert wrapper(alive_r).returncode != 0 and not ran.exists()
    finally:
        for fd in (marker_r, done_r, done_w, alive_r):
            os.close(fd)


@needs_isolation
def test_without_setpriv_programs_are_still_isolated(monkeypatch):
    """Requiring util-linux's setpriv for the parent-death signal made a machine without it run programs as
    root with no namespaces, silently."""
    from crystal_lm.eval import sandbox

    real_which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "setpriv" else real_which(name))
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    iso = sandbox.isolation()
    assert iso.namespaces and iso.unprivileged and iso.death_prefix == ()
    result = run("import os\nprint(os.getuid())\n", 20)
    assert result.passed and int(result.stdout.split()[0]) >= sandbox._UID_BASE
