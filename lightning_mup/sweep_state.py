"""A sweep folder's state: the lock one running sweep holds, each run's status, and reading and writing them
atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_mup._run_folder import LOG_FILE, RUN_FILE


def sweep_status(out: Path) -> dict[str, list[str]]:
    """Where a sweep folder stands: run names by state — ``done``, ``running`` (a sweep holds the folder's lock),
    ``interrupted`` (marked running, but no sweep holds the lock: killed; the next sweep reruns them) and
    ``failed`` — read from each run's ``run.json``."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} does not exist or is not a folder; give the folder a sweep wrote (--out)")
    alive = lock_held(out)
    states: dict[str, list[str]] = {"done": [], "running": [], "interrupted": [], "failed": []}
    for run_file in sorted(out.glob(f"*/{RUN_FILE}")):
        status = read_json(run_file).get("status", "unreadable")
        if status == "running":
            status = "running" if alive else "interrupted"
        states.setdefault(status, []).append(run_file.parent.name)
    return states


def lock_held(out: Path) -> bool:
    import fcntl

    path = out / ".sweep.lock"
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def print_status(out: Path) -> None:
    states = sweep_status(out)
    total = sum(len(v) for v in states.values())
    print(f"sweep {out}: {total} runs — " + ", ".join(f"{len(v)} {k}" for k, v in states.items() if v or k == "done"))
    for name in states.get("failed", []):
        error = str(read_json(Path(out) / name / RUN_FILE).get("error", "")).strip().splitlines()
        print(f"  failed       {name}: {error[-1] if error else '?'}  (log: {Path(out) / name / LOG_FILE})")
    for kind in ("running", "interrupted"):
        for name in states.get(kind, []):
            print(f"  {kind:12s} {name}")
    if states.get("interrupted"):
        print("  interrupted runs start over when the same sweep command is run again")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """An exclusive lock on the sweep folder, held inside (the OS also releases it if the process dies)."""
    import fcntl

    with open(out / ".sweep.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise SystemExit(
                f"another sweep (pid {owner}) is running in {out}; wait for it, or give another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def config_key(config: Path, args: list[str]) -> str:
    """What makes a run this run: the recipe's text and every argument but where its folder is."""
    import hashlib

    kept = [a for a in args if not a.startswith(("--trainer.logger.init_args.save_dir=", "--config="))]
    return hashlib.sha1(json.dumps([config.read_text(), kept]).encode()).hexdigest()[:16]
