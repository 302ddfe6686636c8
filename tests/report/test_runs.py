"""Reading run folders: resumed fits stitched, corrupt or partial files named and left out, never used."""

import json

import numpy as np
import pytest

from lightning_mup.report.page import build_report
from lightning_mup.report.runs import CorruptFile, discover, read_metrics


def _run(sweep, name, width=64, seed=0, versions=({"steps": range(0, 50, 10)},), status="done"):
    folder = sweep / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"name": name, "width": width, "seed": seed, "status": status}))
    for i, version in enumerate(versions):
        log_dir = folder / name / f"version_{i}"
        log_dir.mkdir(parents=True)
        rows = "".join(f"{s},{version.get('value', 1.0) / (1 + s)}\n" for s in version["steps"])
        (log_dir / "metrics.csv").write_text("step,train_loss\n" + rows)
        (log_dir / "mup.json").write_text(json.dumps({"parametrization": "mup"}))
    return folder


def test_a_resumed_fit_continues_its_first_folder(tmp_path):
    """Killed after step 60, resumed from the checkpoint at step 40: version_1 logs 40…100."""
    _run(tmp_path, "w64_s0", versions=({"steps": range(0, 70, 10), "value": 2.0}, {"steps": range(40, 110, 10)}))
    (run,) = discover(tmp_path)
    steps, values = run.series("train_loss")
    np.testing.assert_array_equal(steps, np.arange(0, 110, 10))
    np.testing.assert_allclose(values[:4], 2.0 / (1 + steps[:4]))  # before the resume: the first folder's
    np.testing.assert_allclose(values[4:], 1.0 / (1 + steps[4:]))  # from it on: the resumed fit's
    assert [d.name for d in run.log_dirs] == ["version_0", "version_1"]


def test_corrupt_files_are_named_and_left_out(tmp_path):
    for width in (64, 128, 256, 512):
        _run(tmp_path, f"w{width}_s0", width=width)
    truncated = tmp_path / "w64_s0/w64_s0/version_0/metrics.csv"
    truncated.write_text(truncated.read_text()[:-3])  # cut off while being written
    (tmp_path / "w128_s0/w128_s0/version_0/mup.json").write_text("{not json")
    (tmp_path / "w256_s0/run.json").write_text('{"name": "w256_s0", "width": ')
    arrays = tmp_path / "w512_s0/w512_s0/version_0/feature_kernels"
    arrays.mkdir()
    (arrays / "step_00000000.npz").write_bytes(b"PK\x03\x04 not a zip archive")

    problems: list[str] = []
    runs = discover(tmp_path, problems)
    assert [r.name for r in runs] == ["w512_s0"]
    assert any(str(truncated) in p and "cut off" in p for p in problems)
    assert any("w128_s0/version_0/mup.json" in p and "not readable JSON" in p for p in problems)
    assert any("w256_s0/run.json" in p for p in problems)
    assert runs[0].arrays("feature_kernels", 0) is None
    assert "step_00000000.npz: unreadable" in runs[0].problems[0]

    problems = []
    build_report(tmp_path, problems=problems)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Left out" in report and len(problems) >= 3 and all(p in report for p in problems)


@pytest.mark.parametrize(
    "text, message",
    [
        ("step,train_loss\n0,1.0\n1,0.5,7\n", "line 3: 2 columns expected"),
        ("step,train_loss\n0,1.0\n1,abc\n", "line 3: could not convert"),
        ("step,train_loss\n0,1.0\n1,0.", "last line is incomplete"),
    ],
)
def test_a_metrics_file_that_is_not_a_complete_table_is_refused(tmp_path, text, message):
    path = tmp_path / "metrics.csv"
    path.write_text(text)
    with pytest.raises(CorruptFile, match=message):
        read_metrics(path)


def test_report_on_a_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nowhere")
