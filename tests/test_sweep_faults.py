"""A sweep that is killed, run twice at once, or rerun with another configuration loses nothing and mixes
nothing: workers die with it, the folder is locked, finished runs of another configuration are refused."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import _fast_recipe

from lightning_mup.report.page import build_report
from lightning_mup.sweep import main as sweep


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _states(out: Path) -> dict[str, str]:
    states = {}
    for path in out.glob("*/run.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            states[path.parent.name] = json.loads(path.read_text())["status"]
    return states


def _args(recipe: Path, out: Path, steps: int = 30) -> list[str]:
    return ["--config", str(recipe), "--widths", "64,128,256", "--steps", str(steps), "--jobs", "2", "--out", str(out)]


def _rows(out: Path) -> dict[str, list]:
    figures = json.loads((out / "report" / "figures.json").read_text())
    return {f["key"]: f["rows"] for f in figures if not f["skipped"]}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("launcher", ["local", "submitit-local"])
def test_kill_9_leaves_no_process_behind_and_a_rerun_gives_the_uninterrupted_report(tmp_path, launcher):
    """Also through submitit (its local executor: the SLURM path without a cluster): its jobs end with the
    sweep, the rerun keeps what finished, and the report equals an uninterrupted process-pool sweep's."""
    recipe = _fast_recipe(tmp_path)
    out = tmp_path / "killed"
    chosen = ["--launcher", launcher]
    command = [
        sys.executable,
        "-c",
        "from lightning_mup.cli import main; main()",
        "sweep",
        *_args(recipe, out),
        *chosen,
    ]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill it mid-sweep: one run finished, another one's worker alive
        states, workers = _states(out), _descendants(parent.pid)
        if "done" in states.values() and "running" in states.values() and workers:
            break
        time.sleep(0.1)
    else:
        parent.kill()
        pytest.fail(f"the sweep never had a finished and a running run: {_states(out)}")
    finished = {name: (out / name / "run.json").read_text() for name, s in _states(out).items() if s == "done"}
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert workers and not any(_alive(p) for p in workers), "sweep workers outlived their sweep"

    sweep([*_args(recipe, out), *chosen])  # resumes: the finished runs are kept, the rest run from scratch
    for name, text in finished.items():
        assert (out / name / "run.json").read_text() == text, f"{name} was run again"
    assert not list(out.glob("*/*/version_1")), "a run wrote a second version folder"
    assert set(_states(out).values()) == {"done"}

    reference = tmp_path / "uninterrupted"
    sweep(_args(recipe, reference))  # the default process pool
    build_report(out)
    build_report(reference)
    assert _rows(out) == _rows(reference)


def test_a_second_sweep_in_the_same_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / ".sweep.lock", "w") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        with pytest.raises(SystemExit, match=r"another sweep \(pid 4242\) is running in"):
            sweep(_args(_fast_recipe(tmp_path), out))


@pytest.mark.slow
def test_runs_of_another_configuration_are_not_reused(tmp_path):
    recipe, out = _fast_recipe(tmp_path), tmp_path / "sweep"
    args = ["--config", str(recipe), "--widths", "64", "--steps", "10", "--out", str(out)]
    sweep(args)
    with pytest.raises(SystemExit, match=r"already holds finished runs of another configuration \(w64_s0"):
        sweep([*args[:-4], "--steps", "20", "--out", str(out)])
    assert json.loads((out / "w64_s0" / "run.json").read_text())["status"] == "done"  # left as it was


def test_status_tells_done_running_interrupted_and_failed(tmp_path, capsys):
    import fcntl

    from lightning_mup.sweep import main as sweep_main
    from lightning_mup.sweep_state import sweep_status

    for name, state in {
        "w64_s0": {"status": "done"},
        "w128_s0": {
            "status": "failed",
            "error": "Traceback ...\nRuntimeError: mat1 and mat2 shapes cannot be multiplied",
        },
        "w256_s0": {"status": "running"},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"name": name, **state}))
    (tmp_path / ".sweep.lock").write_text("")
    assert sweep_status(tmp_path)["interrupted"] == ["w256_s0"]  # marked running, no sweep holds the folder
    with open(tmp_path / ".sweep.lock", "a+") as held:  # a live sweep holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        states = sweep_status(tmp_path)
        assert states["running"] == ["w256_s0"] and states["done"] == ["w64_s0"] and states["failed"] == ["w128_s0"]
    sweep_main(["--status", str(tmp_path)])
    out = capsys.readouterr().out
    assert "3 runs — 1 done, 1 interrupted, 1 failed" in out
    assert "w128_s0: RuntimeError: mat1 and mat2 shapes cannot be multiplied" in out


def test_a_slurm_rerun_waits_for_live_jobs_and_keeps_finished_ones(tmp_path, monkeypatch):
    """A SLURM sweep killed before its jobs: a rerun refuses while a job of a run it left "running" is queued
    or running (it would run twice, into one folder), and keeps a run whose job finished since."""
    import submitit

    import lightning_mup.sweep_launch as sweep_launch

    recipe, out = _fast_recipe(tmp_path), tmp_path / "sweep"
    args = ["--config", str(recipe), "--widths", "64", "--steps", "5", "--out", str(out), "--launcher", "slurm"]
    sweep(["--config", str(recipe), "--widths", "64", "--steps", "5", "--out", str(out)])  # the run itself
    finished = json.loads((out / "w64_s0" / "run.json").read_text())
    (out / "w64_s0" / "run.json").write_text(json.dumps({**finished, "status": "running", "job_id": "77"}))
    states = {"77": "RUNNING"}

    class FakeJob:  # what submitit reads from sacct / the job's result pickle
        def __init__(self, folder, job_id):
            self.job_id = job_id

        @property
        def state(self):
            return states[self.job_id]

        def result(self):
            return {"status": "done", "seconds": 1.0}

    monkeypatch.setattr(submitit, "SlurmJob", FakeJob)
    submitted = []
    monkeypatch.setattr(sweep_launch.SubmititPool, "submit", lambda self, *a: submitted.append(a))
    with pytest.raises(SystemExit, match=r"w64_s0 \(job 77\).*run them twice.*scancel"):
        sweep(args)
    states["77"] = "COMPLETED"
    sweep(args)
    kept = json.loads((out / "w64_s0" / "run.json").read_text())
    assert kept["status"] == "done" and kept["job_id"] == "77" and not submitted
    assert (out / "w64_s0" / "log.txt").exists()  # the folder was kept, not redone
