"""μP on Lightning's ModelParallelStrategy with 2 CPU processes — FSDP2 data parallel and tensor parallel on a
small transformer: the same weights as one process and as MuPStrategy's DDP, the same role map, the same
coordinate check measured inside the run, a distributed checkpoint that resumes to the uninterrupted run;
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


def _roles(path):
    """A saved role map without its notes: they are for people, and say how long the self-check took."""
    roles = json.loads(path.read_text())
    roles.pop("notes", None)
    return roles


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
            # measured 3.3e-7 after 6 steps and 3.4e-7 after the resume to 10: only reduction order differs
            torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-6, msg=f"{name} after {steps} steps")
        assert _roles(tmp_path / f"sharded_{steps}.json") == _roles(tmp_path / f"single_{steps}.json")
    _run(tmp_path, "ddp", str(tmp_path))  # MuPStrategy over 2 processes, the same global batch
    ddp = torch.load(tmp_path / "ddp_6_weights.pt")
    for name, value in torch.load(tmp_path / "sharded_6_weights.pt").items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-5, msg=f"{name}: DDP against FSDP2")
    # the coordinate check (each layer's output RMS at the first step and after the last) measured in the run
    single = json.loads((tmp_path / "single_6_coordinates.json").read_text())
    for kind in ("sharded", "ddp"):
        measured = json.loads((tmp_path / f"{kind}_6_coordinates.json").read_text())
        assert measured.keys() == single.keys() == {"init", "trained"}
        for when, sizes in single.items():
            assert measured[when].keys() == sizes.keys() and len(sizes) == 3
            for layer, size in sizes.items():
                assert measured[when][layer] == pytest.approx(size, rel=1e-5), (kind, when, layer)
    assert single["trained"] != single["init"]
    role_map = json.loads((tmp_path / "sharded_6.json").read_text())
    assert role_map["params"]["net.features.2.weight"]["role"] == "hidden"  # roles from the unsharded names


@pytest.mark.slow
def test_tensor_parallel_mup_on_a_transformer_equals_one_process(tmp_path):
    """A Llama-style LanguageModel whose configure_model applies Megatron's plan (q/k/v and the gated MLP's
    up-projections column-parallel, o_proj and down_proj row-parallel: 2 heads per rank), 2 ranks."""
    _run(tmp_path, "tensor_parallel_transformer", str(tmp_path))
    _run(tmp_path, "single_transformer", str(tmp_path))
    parallel = torch.load(tmp_path / "tensor_parallel_transformer_6_weights.pt")
    single = torch.load(tmp_path / "single_transformer_6_weights.pt")
    assert parallel.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(parallel[name], value, rtol=0, atol=1e-5, msg=name)
    record = _roles(tmp_path / "single_transformer_6.json")
    assert _roles(tmp_path / "tensor_parallel_transformer_6.json") == record
    assert record["params"]["model.model.layers.0.self_attn.q_proj.weight"]["role"] == "hidden"


def test_callbacks_refuse_sharded_runs_before_training(tmp_path):
    from types import SimpleNamespace

    from lightning_mup import MuPModelParallelStrategy
    from lightning_mup.callbacks import FeatureKernels, MeasurementError

    trainer = SimpleNamespace(strategy=MuPModelParallelStrategy(base={"width": 32}), log_dir=str(tmp_path))
    with pytest.raises(MeasurementError, match="does not measure sharded models.*MuPStrategy"):
        FeatureKernels().setup(trainer, None, "fit")


def test_tensor_parallel_gpt2_is_refused_with_the_fix():
    from types import SimpleNamespace

    from lightning_mup.models.language import LanguageModel

    module = LanguageModel(architecture="gpt2", width=32, depth=1, heads=2, max_len=8)
    module._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2)}
    with pytest.raises(ValueError, match="fused q/k/v.*architecture='llama', or tensor_parallel_size=1"):
        module.configure_model()
