"""The sandbox against hostile programs: each is contained, scored as failed with its reason, and the
evaluation carries on."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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
    shared = Path(tempfile.mkdtemp(prefix="crystal-daemon-test-"))  # a folder the sandbox user may write
    os.chmod(shared, 0o777)
    started, survived = shared / "started", shared / "survived"
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # its own session: a process-group kill would miss it
        f"    open({str(started)!r}, 'w').write('up')\n"
        "    time.sleep(2)\n"
        f"    open({str(survived)!r}, 'w').write('still here')\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
    )
    try:
        assert run(code, 5).status == "passed"
        time.sleep(3)
        assert started.exists() and not survived.exists()  # it ran, and died with the program
    finally:
        shutil.rmtree(shared, ignore_errors=True)


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
    target = tmp_path / "owned.txt"
    r = run(f"open({str(target)!r}, 'w').write('x')\n", 5)
    assert r.status == "failed" and "Permission" in r.reason and not target.exists()


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("CRYSTAL_SECRET_TOKEN", "hunter2")
    r = run("import os\nassert 'CRYSTAL_SECRET_TOKEN' not in os.environ\nprint(sorted(os.environ))\n", 5)
    assert r.status == "passed" and "CRYSTAL_SECRET_TOKEN" not in r.stdout
    parent = run(f"print(open('/proc/{os.getpid()}/environ', 'rb').read())\n", 5)
    assert "hunter2" not in parent.stdout


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
