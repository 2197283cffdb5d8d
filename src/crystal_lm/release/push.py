"""Publishing a release to a git-based model hub the way LLM360 published Crystal: the final model (with
the card, logs, data order and report) on `main`, each checkpoint on its own branch named after it.

Works with any git remote: a Hugging Face repo id (`user/name` → https://huggingface.co/user/name), a URL,
or a local repository (how the tests stand in for the hub). Large weight files go through git-lfs when it is
installed (the Hugging Face hub requires it for files over 10 MB).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from crystal_lm.release.bundle import ReleaseError

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def remote_url(repo: str) -> str:
    if "://" in repo or repo.startswith("git@") or Path(repo).exists():
        return repo
    if repo.count("/") == 1:
        return f"https://huggingface.co/{repo}"
    raise ReleaseError(f"--push {repo!r}: give a hub repo id (user/name), a git URL or a local repository")


def _git(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    ident = ["-c", "user.name=crystal-lm", "-c", "user.email=crystal-lm@localhost"]
    return subprocess.run(
        ["git", *ident, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def check_reachable(url: str, timeout: float = 20.0) -> None:
    """Fail fast, with the reason, when the hub cannot be reached (no network, no such repo, no access)."""
    try:
        r = subprocess.run(
            ["git", "ls-remote", "--heads", url],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except subprocess.TimeoutExpired:
        raise ReleaseError(
            f"cannot reach {url} within {timeout:.0f}s: is there network access to it?"
        ) from None
    if r.returncode != 0:
        reason = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ReleaseError(
            f"cannot reach {url}: {reason}. Pushing needs network access to the hub, an existing repository "
            "and credentials (e.g. a git credential helper with a write token)."
        )


def _publish(work: Path, url: str, branch: str, files: list[tuple[Path, str]], message: str) -> str:
    """Make `branch` hold exactly `files` (source, path in repo), on top of its history if it exists."""
    fetched = _git(["fetch", "--depth=1", url, f"refs/heads/{branch}"], work)
    if fetched.returncode == 0:
        _git(["checkout", "-q", "-B", "publish", "FETCH_HEAD"], work)
    else:
        _git(["checkout", "-q", "--orphan", f"publish-{branch}"], work)
    _git(["rm", "-rq", "--cached", "--ignore-unmatch", "."], work)
    for p in work.iterdir():
        if p.name != ".git":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    lfs = shutil.which("git-lfs") is not None
    if lfs:
        (work / ".gitattributes").write_text(
            "".join(f"{pat} filter=lfs diff=lfs merge=lfs -text\n" for pat in LFS_PATTERNS)
        )
    for src, rel in files:
        dst = work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    _git(["add", "-A"], work)
    if _git(["diff", "--cached", "--quiet"], work).returncode == 0 and fetched.returncode == 0:
        return "unchanged"
    r = _git(["commit", "-q", "-m", message], work)
    if r.returncode != 0:
        raise ReleaseError(f"git commit for {branch} failed: {r.stderr.strip()}")
    r = _git(["push", "-q", url, f"HEAD:refs/heads/{branch}"], work)
    if r.returncode != 0:
        raise ReleaseError(f"pushing {branch} to {url} failed: {r.stderr.strip()}")
    return "pushed"


def push_release(release: str | Path, repo: str, log: Callable[[str], None] = print) -> dict[str, str]:
    """Push `main` (everything but checkpoints/) and one branch per checkpoint folder. Returns branch →
    "pushed" or "unchanged"; pushing again after an interruption only sends what is missing."""
    release = Path(release)
    url = remote_url(repo)
    check_reachable(url)
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="crystal-push-") as tmp:
        work = Path(tmp)
        if _git(["init", "-q"], work).returncode != 0:
            raise ReleaseError("git init failed; is git installed?")
        if shutil.which("git-lfs"):
            _git(["lfs", "install", "--local"], work)
        main_files = [
            (p, p.relative_to(release).as_posix())
            for p in sorted(release.rglob("*"))
            if p.is_file() and p.relative_to(release).parts[0] != "checkpoints"
        ]
        for ckpt in sorted(p for p in (release / "checkpoints").iterdir() if p.is_dir()):
            files = [(p, p.relative_to(ckpt).as_posix()) for p in sorted(ckpt.rglob("*")) if p.is_file()]
            out[ckpt.name] = _publish(work, url, ckpt.name, files, f"checkpoint {ckpt.name}")
            log(f"{ckpt.name}: {out[ckpt.name]}")
        out["main"] = _publish(work, url, "main", main_files, f"release of {release.name}")
        log(f"main: {out['main']}")
    return out
