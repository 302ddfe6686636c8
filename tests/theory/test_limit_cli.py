"""``lightning-mup limit`` on a recipe: refused with every reason where the recipe is outside the solver's scope,
computed on the recipe's own points where it is inside, and drawn by the report against a sweep's widths."""

import json

import numpy as np
import pytest

from lightning_mup.cli import main
from lightning_mup.limit import OutOfScope, limit_inputs
from lightning_mup.report.page import build_report
from lightning_mup.sweep import main as sweep
from lightning_mup.theory import solve_dmft

RECIPES = __import__("pathlib").Path(__file__).parents[2] / "recipes"


def test_a_recipe_outside_the_solvers_scope_is_refused_with_every_reason():
    with pytest.raises(OutOfScope) as error:
        limit_inputs(RECIPES / "gegenbauer.yaml", [])
    message = str(error.value)
    for reason in ("parametrization=mf", "bias=false", "init=normal", "train_size"):
        assert reason in message, reason
    with pytest.raises(OutOfScope, match="SGD with momentum"):
        limit_inputs(RECIPES / "gegenbauer_limit.yaml", ["--model.init_args.optimizer.init_args.momentum=0.9"])
    with pytest.raises(OutOfScope, match="readout_zero_init=true"):  # the readout's w(0) would not be N(0, 1)
        limit_inputs(RECIPES / "gegenbauer_limit.yaml", ["--trainer.strategy.init_args.readout_zero_init=true"])
    with pytest.raises(OutOfScope, match="Langevin chain's limit is the posterior's saddle point"):
        limit_inputs(RECIPES / "gegenbauer_langevin.yaml", [])


@pytest.mark.slow
def test_the_limit_of_a_recipe_and_the_report_against_it(tmp_path, capsys):
    out = tmp_path / "sweep"
    recipe = RECIPES / "gegenbauer_limit.yaml"
    sweep(["--config", str(recipe), "--widths", "64,256", "--seeds", "2", "--out", str(out), "--jobs", "2"])
    main(["limit", "--config", str(recipe), "--out", str(out), "--samples", "200", "--replicas", "2"])
    saved = np.load(out / "limit.npz")
    settings = json.loads(str(saved["settings"]))
    assert settings["converged"] and settings["lr"] == 0.5 and settings["gamma0"] == 1.0 and settings["steps"] == 10
    # the recipe's own points and settings: the same numbers as calling the solver directly
    inputs = limit_inputs(recipe, [])
    inputs.pop("y_test"), inputs.pop("fingerprint"), inputs.pop("probe")
    direct = solve_dmft(**inputs, samples=200, replicas=2)
    np.testing.assert_allclose(saved["loss"], direct.loss, rtol=1e-12)
    assert saved["loss"][-1] < 0.5 * saved["loss"][0]  # it trained
    figures = {f.key: f for f in build_report(out)}
    comparison = figures["limit_comparison"]
    assert comparison.skipped is None and [row[0] for row in comparison.rows] == [64, 256]
    for width, _seeds, final, limit, deviation in comparison.rows:
        assert abs(final - limit) == pytest.approx(deviation)
        assert deviation < 0.2 * limit, width  # near the limit (the loss fell 5× from 1.67)
    assert any("within the limit's own Monte Carlo error" in c or "widths" in c for c in comparison.caveats)
    # the recipe's EnsembleLogits: the seed-mean predictions on the limit's training points, per width
    assert "Seed-mean predictions on the training points" in comparison.note
    assert "N = 64: " in comparison.note and "N = 256: " in comparison.note
    # a run of another configuration (here γ0) in the sweep folder is left out, and said
    (config,) = (out / "w256_s0").glob("**/config.yaml")
    config.write_text(config.read_text().replace("gamma0: 1.0", "gamma0: 0.5"))
    comparison = {f.key: f for f in build_report(out)}["limit_comparison"]
    assert [row[:2] for row in comparison.rows] == [[64, 2], [256, 1]]
    assert any("1 of 4 runs have another configuration" in c for c in comparison.caveats)
    # the recipe's callbacks measured the last step on the limit's own training points: histograms and kernels
    features = {f.key: f for f in build_report(out)}["limit_features"]
    assert features.skipped is None and features.path is not None
    print("limit_features rows", features.rows, features.caveats)
    for width, _seeds, layer, ks, alignment in features.rows:
        assert layer in (1, 2) and ks < 0.15 and alignment > 0.95, (width, layer, ks, alignment)
    # a limit of other points (here a changed probe fingerprint): nothing compared, and said
    saved = dict(np.load(out / "limit.npz"))
    settings["probe_fingerprint"] = "0" * 16
    saved["settings"] = np.array(json.dumps(settings))
    np.savez(out / "limit.npz", **saved)
    features = {f.key: f for f in build_report(out)}["limit_features"]
    assert features.skipped and "on the training set" in features.skipped and not features.rows
    assert any("other points than the limit's training set" in c for c in features.caveats)
