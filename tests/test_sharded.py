"""μP on Lightning's ModelParallelStrategy with 2 CPU processes — FSDP2 data parallel and tensor parallel: the
same weights as one process, the same role map, a distributed checkpoint that resumes to the uninterrupted run;
callbacks refuse sharded runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "sharded_run.py"


def _run(tmp_path, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_sharded_mup_equals_one_process_and_resumes(tmp_path):
    launched = _run(tmp_path, "sharded", str(tmp_path))
    assert "GLOBAL_RANK: 1" in launched.stderr + launched.stdout  # two processes
    _run(tmp_path, "sharded", str(tmp_path), "resume")
    _run(tmp_path, "single", str(tmp_path))
    for steps in (6, 10):  # 6: the sharded fit; 10: resumed from its distributed checkpoint at 6
        sharded = torch.load(tmp_path / f"sharded_{steps}_weights.pt")
        single = torch.load(tmp_path / f"single_{steps}_weights.pt")
        assert sharded.keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-5, msg=f"{name} after {steps} steps")
        assert json.loads((tmp_path / f"sharded_{steps}.json").read_text()) == json.loads(
            (tmp_path / f"single_{steps}.json").read_text()
        )
    role_map = json.loads((tmp_path / "sharded_6.json").read_text())
    assert role_map["params"]["net.features.2.weight"]["role"] == "hidden"  # roles from the unsharded names


@pytest.mark.slow
def test_tensor_parallel_mup_equals_one_process(tmp_path):
    """Column- then row-parallel hidden layers (torch's parallelize_module plan in configure_model), 2 ranks."""
    _run(tmp_path, "tensor_parallel", str(tmp_path))
    _run(tmp_path, "single", str(tmp_path))
    parallel, single = (
        torch.load(tmp_path / "tensor_parallel_6_weights.pt"),
        torch.load(tmp_path / "single_6_weights.pt"),
    )
    for name, value in single.items():
        torch.testing.assert_close(parallel[name], value, rtol=0, atol=1e-5, msg=name)
    assert json.loads((tmp_path / "tensor_parallel_6.json").read_text()) == json.loads(
        (tmp_path / "single_6.json").read_text()
    )


def test_callbacks_refuse_sharded_runs_before_training(tmp_path):
    from types import SimpleNamespace

    from lightning_mup import MuPModelParallelStrategy
    from lightning_mup.callbacks import FeatureKernels, MeasurementError

    trainer = SimpleNamespace(strategy=MuPModelParallelStrategy(base={"width": 32}), log_dir=str(tmp_path))
    with pytest.raises(MeasurementError, match="does not measure sharded models.*MuPStrategy"):
        FeatureKernels().setup(trainer, None, "fit")
