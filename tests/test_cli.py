"""The command line a user runs: the recipe, its run folder, the real DDP launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_mup.cli import main

RECIPE = Path(__file__).parents[1] / "recipes" / "gegenbauer.yaml"


def _fit(tmp_path, *extra):
    main(
        [
            "fit",
            f"--config={RECIPE}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=40",
            "--trainer.val_check_interval=20",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )
    return next((tmp_path / "gegenbauer").glob("version_*"))


def test_recipe_leaves_a_complete_run_folder(tmp_path):
    run = _fit(tmp_path, "--model.init_args.width=128")
    assert {"metrics.csv", "config.yaml", "mup.json", "hparams.yaml"} <= {p.name for p in run.iterdir()}
    role_map = json.loads((run / "mup.json").read_text())
    assert role_map["params"]["model.features.2.weight"]["width_mult"] == 2.0
    lines = (run / "metrics.csv").read_text().splitlines()
    # CSVLogger sorts its columns, so check membership, not order.
    assert {"epoch", "step", "train_loss", "val_loss", "sharpness"} <= set(lines[0].split(",")) and len(lines) > 2


def test_top_level_optimizer_flag_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="silently off"):
        _fit(tmp_path, "--optimizer=SGD", "--optimizer.lr=0.1")


@pytest.mark.slow
def test_real_ddp_launch_from_the_command_line(tmp_path):
    """`lightning-mup fit --trainer.devices=2`: Lightning re-launches the command once per rank."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_mup.cli",
            "fit",
            f"--config={RECIPE}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.devices=2",
            "--trainer.max_steps=30",
            "--trainer.val_check_interval=10",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "gegenbauer").glob("version_*"))
    assert len(runs) == 1  # one run folder, written by rank 0 only
    assert (runs[0] / "mup.json").exists()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout


def test_coord_check_of_a_users_recipe(tmp_path, capsys):
    """The user's own LightningModule, optimizer and data (the recipe), at several widths: flat under μP."""
    figure = tmp_path / "coord.png"
    main(["coord-check", f"--config={RECIPE}", "--widths=64,256", "--steps=4", "--seeds=2", f"--out={figure}"])
    out = capsys.readouterr().out
    assert figure.is_file() and "coordinate check (mup), widths [64, 256]" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("model.features")}
    changes = [float(row[5]) for row in rows.values()]  # |Δh| over the steps after the first: slope ≈ 0 under μP
    assert len(changes) == 4 and all(abs(c) < 0.2 for c in changes), rows
