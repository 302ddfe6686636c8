"""A miniature sweep end to end: runs, resume, failures, and every figure and number of the report."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_mup.report.page import build_report
from lightning_mup.sweep import main as sweep

RECIPE = Path(__file__).parents[1] / "recipes" / "gegenbauer.yaml"


def _fast_recipe(tmp_path: Path) -> Path:
    """The quick-start recipe with cadences that fit into a few dozen steps."""
    config = yaml.safe_load(RECIPE.read_text())
    config["trainer"]["val_check_interval"] = 10
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_mup.callbacks.EnsembleLogits", "init_args": {"every_n_steps": 10}},
        {"class_path": "lightning_mup.callbacks.FeatureKernels", "init_args": {"every_n_steps": 20}},
        {"class_path": "lightning_mup.callbacks.PreactivationHistograms", "init_args": {"every_n_steps": 20}},
        {"class_path": "lightning_mup.callbacks.Sharpness", "init_args": {"every_n_steps": 20}},
        {"class_path": "lightning_mup.callbacks.AfterNTK", "init_args": {"num_batches": 2}},
        {"class_path": "lightning_mup.callbacks.UpdateSizes", "init_args": {"every_n_steps": 10}},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_miniature_sweep_and_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = [
        "--config",
        str(_fast_recipe(tmp_path)),
        "--widths",
        "64,128",
        "--seeds",
        "2",
        "--steps",
        "40",
        "--jobs",
        "2",
        "--out",
        str(out),
    ]
    sweep(args)
    runs = sorted(p.parent.name for p in out.glob("*/run.json"))
    assert runs == ["w128_s0", "w128_s1", "w64_s0", "w64_s1"]
    assert all(json.loads((out / r / "run.json").read_text())["status"] == "done" for r in runs)
    assert json.loads((out / "sweep.json").read_text())["failed"] == []

    sweep(args)  # resumable: finished runs are skipped
    assert "4 already done, 0 to run" in capsys.readouterr().out

    figures = {f.key: f for f in build_report(out)}
    report = out / "report"
    assert {"report.html", "report.md", "figures.json"} <= {p.name for p in report.iterdir()}
    expected = [
        "loss_curves",
        "logit_rmse",
        "cka_to_widest",
        "preactivations",
        "sharpness",
        "ensembles",
        "after_ntk",
        "update_sizes",
    ]
    for key in expected:
        figure = figures[key]
        assert figure.skipped is None, (key, figure.skipped)
        assert figure.path.exists() and figure.path.stat().st_size > 10_000, key
        assert figure.rows, key
        numbers = [v for row in figure.rows for v in row if isinstance(v, float)]
        assert numbers and all(math.isfinite(v) for v in numbers), (key, figure.rows)
        assert f"![{figure.title}]({figure.path.name})" in (report / "report.md").read_text()
    assert {row[1] for row in figures["loss_curves"].rows} == {64, 128}
    assert all(row[2] == 2 for row in figures["ensembles"].rows)  # the two seeds are the ensemble
    assert all(row[0].startswith("mup") for row in figures["loss_curves"].rows)  # read from each run's mup.json
    # Preactivation statistics pool both seeds' saved samples at the last step.
    layer, width, step, variance = next(r[1:5] for r in figures["preactivations"].rows if r[2] == 64 and r[3] > 0)
    pooled = np.concatenate(
        [
            np.load(next((out / f"w64_s{s}").glob(f"*/preactivations/step_{step:08d}.npz")))[f"samples/{layer}"].ravel()
            for s in (0, 1)
        ]
    )
    assert variance == pytest.approx(pooled.var(), rel=1e-12)
    assert "three widths" in figures["width_scaling"].skipped
    assert "--lrs" in figures["lr_transfer"].skipped
    html = (report / "report.html").read_text()
    assert "skipped: the sweep has no learning-rate axis" in html
    assert len(_embedded_figures(report / "report.html")) == sum(f.skipped is None for f in figures.values())
    assert "Measured (mup): ensembling lowers the loss" in figures["ensembles"].note


def _embedded_figures(page: Path) -> list[bytes]:
    """The PNGs inside a report.html; fails on any image that points outside the page."""
    import base64
    import re

    sources = re.findall(r"<img src='([^']*)'", page.read_text())
    assert all(src.startswith("data:image/png;base64,") for src in sources), [s[:40] for s in sources]
    return [base64.b64decode(src.split(",", 1)[1]) for src in sources]


@pytest.mark.slow
def test_a_one_seed_twenty_step_sweep_reports_what_it_cannot_show(tmp_path):
    """The shipped recipe (cadences of hundreds of steps) for 20 steps, one seed, three widths."""
    out = tmp_path / "sweep"
    sweep(["--config", str(RECIPE), "--widths", "64,128,256", "--steps", "20", "--jobs", "2", "--out", str(out)])
    figures = {f.key: f for f in build_report(out)}
    assert "--seeds 2" in figures["ensembles"].skipped  # an "ensemble" of one member is not drawn
    caveats = {key: " ".join(f.caveats) for key, f in figures.items()}
    assert "three parameters fitted to 3 widths" in caveats["width_scaling"]
    assert "single network" in caveats["logit_rmse"]
    assert "one seed" in caveats["after_ntk"]
    for key in ("cka_to_widest", "preactivations", "sharpness"):
        assert "only the initialisation was measured" in caveats[key], key
    markdown = (out / "report" / "report.md").read_text()
    assert markdown.count("> ⚠") == sum(len(f.caveats) for f in figures.values())

    # The page alone, moved elsewhere, still shows every figure.
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    moved.write_bytes((out / "report" / "report.html").read_bytes())
    images = _embedded_figures(moved)
    drawn = [f for f in figures.values() if f.skipped is None]
    assert len(images) == len(drawn) and all(png.startswith(b"\x89PNG") for png in images)
    assert images == [f.path.read_bytes() for f in drawn]


@pytest.mark.slow
def test_a_miniature_depth_sweep_and_its_report(tmp_path):
    """Depths × a --grid axis × learning rates at one width: folders named by their values, and the report
    compares depths within each setting."""
    out = tmp_path / "sweep"
    recipe = Path(__file__).parents[1] / "recipes" / "residual_mlp.yaml"
    args = ["--config", str(recipe), "--widths", "64", "--depths", "2,4", "--lrs", "0.002,0.008", "--steps", "20"]
    sweep([*args, "--grid", "trainer.strategy.init_args.depth_alpha=0,1", "--jobs", "2", "--out", str(out)])
    names = sorted(p.parent.name for p in out.glob("*/run.json"))
    assert names == sorted(
        f"w64_d{d}_s0_depth_alpha-{a}_lr{lr}" for d in (2, 4) for a in (0, 1) for lr in ("0.002", "0.008")
    )
    for name in names:  # each run was built at its depth, its branches scaled (α = 1) or not (α = 0)
        role_map = json.loads(next((out / name).glob("*/mup.json")).read_text())
        depth = int(name.split("_")[1][1:])
        assert role_map["depth"] == depth and role_map["settings"]["depth_alpha"] == int(name.split("-")[1][0])
        branch = [h for h in role_map["hooks"] if h["module"].endswith(".out")]
        assert len(branch) == (depth if "alpha-1" in name and depth > 2 else 0)
    figures = {f.key: f for f in build_report(out)}
    rows = figures["depth_transfer"].rows
    assert {(row[0], row[1]) for row in rows} == {(f"mup, depth_alpha={a}", d) for a in (0, 1) for d in (2, 4)}
    assert all(row[2] in (0.002, 0.008) for row in rows)
    assert "spread" in figures["depth_transfer"].note and figures["depth_transfer"].path.exists()
    assert len(figures["loss_vs_depth"].rows) == 4 and "--widths" in figures["optima_grid"].skipped


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "submitit-local"])
def test_a_failing_run_is_retried_then_reported(tmp_path, launcher, capsys):
    """The "width" here is the data's input dimension: 5 matches the model, 7 fails inside the run. The same
    through submitit (its local executor: the SLURM path without a cluster)."""
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        sweep(
            [
                "--config",
                str(_fast_recipe(tmp_path)),
                "--widths",
                "5,7",
                "--width-key",
                "data.init_args.dim",
                "--steps",
                "3",
                "--out",
                str(out),
                "--set",
                "trainer.callbacks=[]",
                "--launcher",
                launcher,
            ]
        )
    assert exit_info.value.code == 1
    failed = json.loads((out / "w7_s0" / "run.json").read_text())
    assert failed["status"] == "failed" and failed["attempts"] == 2 and "cannot be multiplied" in failed["error"]
    assert json.loads((out / "w5_s0" / "run.json").read_text())["status"] == "done"
    assert json.loads((out / "sweep.json").read_text())["failed"] == ["w7_s0"]
    # Each run's own output is kept beside it: the traceback of the failure, the μP summary of the success.
    assert "cannot be multiplied" in (out / "w7_s0" / "log.txt").read_text()
    assert "optimizer groups" in (out / "w5_s0" / "log.txt").read_text()
    if launcher == "submitit-local":
        assert list((out / ".submitit").glob("*")), "submitit's job folders"
    capsys.readouterr()
    sweep(["--status", str(out)])
    assert "2 runs — 1 done, 1 failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--widths", "64,abc"], "--widths '64,abc': expected a comma-separated list"),
        (["--widths", "64", "--parametrization", "mup,mu"], "unknown ['mu']"),
        (["--widths", "64", "--lrs", "0.1,-1"], "learning rates must be positive"),
        (["--widths", "64", "--jobs", "0"], "--jobs 0: at least one"),
    ],
)
def test_bad_flags_are_refused_before_any_run(tmp_path, capsys, flags, message):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit):
        sweep(["--config", str(RECIPE), "--out", str(out), *flags])
    assert message in capsys.readouterr().err
    assert not list(out.glob("*/run.json"))


def test_a_recipe_without_mup_strategy_is_refused(tmp_path):
    config = yaml.safe_load(RECIPE.read_text())
    config["trainer"]["strategy"] = "auto"
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="needs trainer.strategy: {class_path: lightning_mup.MuPStrategy"):
        sweep(["--config", str(path), "--widths", "64", "--out", str(tmp_path / "sweep")])
