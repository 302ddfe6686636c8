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


def test_a_resumed_runs_after_kernel_is_read_from_every_version_folder(tmp_path):
    """AfterNTK wrote its arrays in the first fit; the resumed fit (version_1) ended before writing any: the
    figure still has the run's kernel — it once read the last version folder only and lost it."""
    from lightning_mup.report.figures import after_ntk

    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 4))
    for width in (64, 256):
        for seed in (0, 1):
            folder = _run(
                tmp_path, f"w{width}_s{seed}", width, seed, versions=({"steps": range(0, 50, 10)}, {"steps": [40, 50]})
            )
            arrays = folder / folder.name / "version_0" / "after_ntk"
            arrays.mkdir()
            kernel = features @ features.T * (1 + 0.1 * seed) * width / 64
            np.savez(
                arrays / "step_00000040.npz",
                kernel=kernel,
                flow_steps=np.linspace(0, 40, 5),
                targets=np.ones((6, 1)),
                initial_outputs=np.zeros((6, 1)),
                lr=0.1,
                probe_fingerprint="same",
            )
    runs = discover(tmp_path)
    assert all([d.name for d in r.log_dirs] == ["version_0", "version_1"] for r in runs)
    figure = after_ntk(runs, tmp_path / "report")
    assert figure.path is not None and figure.path.exists()
    by_width = {row[1]: row for row in figure.rows}
    assert by_width[64][2] == 2 and by_width[256][2] == 2  # both seeds, from version_0
    expected = np.linalg.eigvalsh(features @ features.T * 1.05)[-1] / 6
    assert by_width[64][3] == pytest.approx(expected)
