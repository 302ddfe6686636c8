"""What a newcomer meets: help that lists the commands, and one line (no traceback) for each mistake, before
any training."""

from __future__ import annotations

from pathlib import Path

import lightning  # noqa: F401  (imported here, its log handler writes to the real stderr, not one test's capture)
import pytest

from lightning_mup.cli import main

RECIPE = Path(__file__).parents[1] / "recipes" / "gegenbauer.yaml"


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    captured = capsys.readouterr()
    text = captured.err.strip() or str(exit_info.value.code)
    assert "Traceback" not in captured.err
    return text.splitlines()[-1]


def test_help_lists_every_command_with_a_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "sweep", "report", "coord-check"):
        assert any(line.strip().startswith(command + " ") and len(line.split()) > 3 for line in out.splitlines())


def test_an_unknown_command_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt"])
    assert exit_info.value.code == 2 and "unknown command 'fitt'" in capsys.readouterr().err


def _fit(tmp_path, *extra):
    return [
        "fit",
        f"--config={RECIPE}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.init_args.width=0"], "lightning-mup fit: width=0: an MLP needs at least one hidden unit"),
        (["--trainer.strategy.init_args.parametrization=mu-p"], "unknown parametrization 'mu-p'; choose one of"),
        (["--trainer.strategy.init_args.gamma0=0.5"], "gamma0=0.5 has no effect here"),
    ],
)
def test_fit_mistakes_are_one_line_before_training(tmp_path, capsys, extra, message):
    line = _error(capsys, _fit(tmp_path, *extra))
    assert message in line
    assert not list(tmp_path.glob("**/metrics.csv"))  # nothing trained


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    recipe = Path(__file__).parents[1] / "recipes" / "cifar_resnet18.yaml"
    line = _error(
        capsys,
        [
            "fit",
            f"--config={recipe}",
            f"--data.init_args.root={tmp_path / 'none'}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=1",
        ],
    )
    assert line.startswith("lightning-mup fit: FileNotFoundError: CIFAR-10 not found at")


def test_sweep_settings_the_recipe_does_not_take_are_found_before_any_run(tmp_path, capsys):
    line = _error(
        capsys,
        [
            "sweep",
            "--config",
            str(RECIPE),
            "--widths",
            "64",
            "--width-key",
            "model.init_args.hidden",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert "Option 'hidden' is not accepted" in line
    assert not list((tmp_path / "s").glob("*/run.json"))  # no run started


def test_report_of_a_folder_that_does_not_exist(tmp_path, capsys):
    assert "does not exist" in _error(capsys, ["report", str(tmp_path / "nowhere")])


def test_coord_check_flags_match_the_sweeps(capsys):
    line = _error(capsys, ["coord-check", "--parametrization", "mup,mu-p", "--widths", "64,128"])
    assert "unknown parametrization ['mu-p']" in line
    with pytest.raises(SystemExit):
        main(["coord-check", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text wraps at the terminal width
    assert "lightning-mup coord-check" in out and "--batch-size" in out and "(default: mup,sp)" in out


@pytest.mark.parametrize("command", ["sweep", "limit", "coord-check"])
def test_help_shows_defaults_that_are_values_once_and_every_mode(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in out and "(default: [])" not in out
    assert "(default: all; fewer for large P·T — their sampling error is in the error bars) (default" not in out
    if command == "sweep":
        assert "--status SWEEP_DIR instead of running" in out  # an option, not an epilogue
        assert "--seeds SEEDS initialisation seeds per cell (default: 1)" in out
        assert "--lrs LRS comma-separated learning rates (default: the recipe's)" in out
