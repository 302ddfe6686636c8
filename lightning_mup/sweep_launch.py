"""Where a sweep's runs run: a local process pool, or submitit (SLURM or its local executor), with the watchdog
that ends a worker when its sweep dies and the adoption of SLURM jobs a killed sweep left behind."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_mup._run_folder import RUN_FILE
from lightning_mup.sweep_state import read_json, write_json

if TYPE_CHECKING:
    from lightning_mup.sweep import Cell

LAUNCHERS = ("local", "slurm", "submitit-local")


def local_pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=max(1, jobs),
        mp_context=get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )


def check_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ValueError(
            "--launcher slurm needs submitit: pip install 'lightning-mup[slurm]' (or pip install submitit)"
        ) from None


def parse_slurm(entries: list[str]) -> dict[str, Any]:
    import yaml

    parsed = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm {entry!r}: expected KEY=VALUE, e.g. --slurm slurm_partition=gpu")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


class SubmititPool:
    """The process pool's interface over submitit: each run is one job (on SLURM, or local), at most ``jobs`` at a
    time like the process pool's workers — a thread per slot submits a run's job, records its id and waits for its
    result — so the sweep's loop (retries, run.json, progress) stays the same."""

    def __init__(self, cluster: str, out: Path, jobs: int, devices: int, nodes: int, slurm: dict[str, Any]):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import submitit

        self.cluster = cluster
        self.executor = submitit.AutoExecutor(folder=out / ".submitit", cluster=cluster)
        parameters: dict[str, Any] = {"timeout_min": 60}
        if cluster == "slurm":
            parameters.update(nodes=nodes, tasks_per_node=devices)
            if devices > 1 or slurm.get("gpus_per_node"):
                parameters.setdefault("gpus_per_node", devices)
        parameters.update(slurm)
        self.executor.update_parameters(**parameters)
        self.slots = ThreadPoolExecutor(max_workers=max(1, jobs))
        self.lock = threading.Lock()  # one submission at a time through the executor

    def __enter__(self) -> SubmititPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.slots.shutdown(wait=True)

    def submit(self, fn, *args):
        return self.slots.submit(self._run, fn, args)

    def _run(self, fn, args) -> dict[str, Any]:
        with self.lock:
            if self.cluster == "local":  # a local job ends with its sweep, as the process pool's workers do
                job = self.executor.submit(watched, os.getpid(), fn, *args)
            else:
                job = self.executor.submit(fn, *args)
        # a run (fn(args, folder, threads)): a later sweep must know its job is out there (see slurm_leftovers)
        folder = Path(args[1]) if len(args) > 1 and isinstance(args[1], str) else None
        if folder is not None and (folder / RUN_FILE).exists():
            write_json(folder / RUN_FILE, {**read_json(folder / RUN_FILE), "job_id": str(job.job_id)})
        return job_result(job)


def watched(sweep_pid: int, fn, *args):
    """A submitit-local job: exit when the sweep that sent it is gone (killed with -9, say), so that a rerun,
    which redoes unfinished runs, never shares a folder with an orphan still writing to it."""
    import threading

    def watch() -> None:
        while True:
            try:
                os.kill(sweep_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="watch-sweep").start()
    return fn(*args)


def adopt_slurm_leftovers(out: Path, pending: list[Cell], summary: dict) -> list[Cell]:
    """Before a SLURM sweep reruns what an earlier one left "running": refuse while those jobs live, keep the
    runs whose job finished after its sweep died. Returns what is left to run."""
    left = [cell.name for cell in pending if read_json(out / cell.name / RUN_FILE).get("status") == "running"]
    live, finished = slurm_leftovers(out, left)
    if live:
        listed = ", ".join(f"{name} (job {job})" for name, job in list(live.items())[:4])
        raise SystemExit(
            f"{len(live)} runs of an earlier sweep of {out} are still queued or running on SLURM: {listed}"
            f"{' ...' if len(live) > 4 else ''}. Rerunning them now would run them twice; wait for them "
            "(squeue) or cancel them (scancel), then rerun"
        )
    for name, result in finished.items():
        if result.get("status") == "done":  # finished after its sweep died: kept
            state = {**read_json(out / name / RUN_FILE), **result}
            write_json(out / name / RUN_FILE, state)
            summary["runs"][name] = state
    return [cell for cell in pending if cell.name not in summary["runs"]]


def slurm_leftovers(out: Path, names: list[str]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Runs left "running" by an earlier SLURM sweep that died before its jobs did: those whose job is still
    queued or running ({run: job id}; rerunning them would run them twice, into the same folder), and those
    whose job has since finished ({run: its result}, kept rather than redone)."""
    import submitit

    live, finished = {}, {}
    for name in names:
        job_id = read_json(out / name / RUN_FILE).get("job_id")
        if job_id is None:
            continue
        job = submitit.SlurmJob(folder=out / ".submitit", job_id=job_id)
        state = job.state.split()[0]
        if state in SLURM_ALIVE:
            live[name] = job_id
        elif state == "COMPLETED":
            finished[name] = job_result(job)
    return live, finished


SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING"}


def job_result(job) -> dict[str, Any]:
    try:
        result = job.result()
    except Exception as error:  # the job itself died (preempted, out of memory, killed): retried, then reported
        return {
            "status": "failed",
            "error": f"job {job.job_id} ended without a result: {type(error).__name__}: {error}",
        }
    # a multi-task job (one task per device) returns one result per task: rank 0's is the run's
    return result[0] if isinstance(result, list) else result


def pool_factory(launcher: str, out: Path, jobs: int, devices: int, nodes: int, slurm: dict[str, Any]):
    if launcher == "local":
        return None
    cluster = "slurm" if launcher == "slurm" else "local"

    def factory(_jobs: int) -> SubmititPool:
        return SubmititPool(cluster, out, jobs, devices, nodes, slurm)

    factory.cluster = cluster  # type: ignore[attr-defined]
    return factory


def die_with_parent(parent: int) -> None:
    """Worker initializer: a worker whose sweep process is gone (killed with -9, say) exits at once rather
    than finish its run into a folder the next sweep will redo, or hang."""
    import threading

    if sys.platform.startswith("linux"):  # immediate: the kernel signals the worker when its parent dies
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    def watch() -> None:  # everywhere else: notice within a second
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
