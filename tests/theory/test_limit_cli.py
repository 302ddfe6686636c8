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
    with pytest.raises(OutOfScope, match="prior_std=2.0"):  # the saddle's prior is the mf form's N(0, 1)
        limit_inputs(RECIPES / "gegenbauer_langevin.yaml", ["--model.init_args.optimizer.init_args.prior_std=2.0"])


def test_a_langevin_recipe_s_limit_is_its_posterior_saddle_and_the_report_draws_widths_against_it(
    tmp_path, monkeypatch
):
    from lightning_mup.measure.distribution import histogram
    from lightning_mup.report.figures import limit_comparison, limit_posterior
    from lightning_mup.report.runs import Run

    recipe, out = RECIPES / "gegenbauer_langevin.yaml", tmp_path / "sweep"
    out.mkdir()
    main(["limit", "--config", str(recipe), "--out", str(out), "--samples", "128", "--saddle-steps", "300"])
    saved = np.load(out / "limit.npz")
    settings = json.loads(str(saved["settings"]))
    # the recipe's mean-over-P loss at its β = 200 is STATICS.md's ½Σ(f − y)² at 2β/P; depth 3 = 2 hidden layers
    assert settings["kind"] == "statics" and settings["beta"] == 2 * 200 / 8 and settings["depth"] == 2
    assert settings["converged"], settings
    saddle, nngp, y = saved["feature_kernels_train_final"], saved["nngp_kernels_train"], saved["y_train"]
    assert all(y @ s @ y > 1.1 * (y @ n @ y) for s, n in zip(saddle, nngp))  # γ0 = 1 grew the kernels along y
    # runs whose posterior-mean kernels sit (1 + 3/N)·Φ* away: the figure finds the slope −1 and the distances
    monkeypatch.setattr("lightning_mup._run_folder.recipe_fingerprint", lambda *a, **k: settings["fingerprint"])
    runs = []
    for width in (64, 256, 1024):
        folder = out / f"w{width}_s0" / "version_0"
        (folder / "posterior").mkdir(parents=True)
        kernels = {f"phi_mean/features.{2 * i + 1}": (1 + 3 / width) * k for i, k in enumerate(saddle)}
        # histograms of the saddle's own draws, the narrow widths' stretched by 1 + 8/N
        edges = np.linspace(-6, 6, 121)
        densities = {
            f"hist/features.{2 * i + 1}": histogram(h * (1 + 8 / width), edges) if width < 1024 else histogram(h, edges)
            for i, h in enumerate(saved["preactivations_train_final"])
        }
        np.savez(
            folder / "posterior" / "step_00020000.npz",
            **kernels,
            **densities,
            edges=edges,
            outputs_mean=saved["adaptive_train_mean"] * (1 + 1 / width),
            **{"ess/kernel/a": np.array(500.0), "probe_fingerprint": np.array(settings["probe_fingerprint"])},
        )
        chain = {"val_loss": (np.arange(0.0, 20_001, 1000), np.full(21, 0.5 + 1 / width))}
        runs.append(Run(f"w{width}_s0", folder.parent, [folder], width, 0, None, "mf", chain))
    figure = limit_posterior(runs, out)
    assert figure.skipped is None, figure.skipped
    assert [row[:3] for row in figure.rows] == [[w, 1, layer] for w in (64, 256, 1024) for layer in (1, 2)]
    for width, _, _, distance, nngp, cosine, tv, ess in figure.rows:
        assert distance == pytest.approx(3 / width) and cosine == pytest.approx(1.0) and ess == 500.0
        assert (tv > 0.02) if width < 1024 else (tv == pytest.approx(0.0))  # the histograms against the tilted density
        assert nngp > 0.01  # the saddle moved away from the NNGP: the metric can tell them apart
    assert "Fitted slopes per layer: -1.00, -1.00" in figure.note and "adaptive predictor" in figure.note
    # predictions against the saddle's, and the validation loss over the chain after PosteriorMoments' burn-in
    assert "N = 64: predictions 0.016, validation loss 0.5156" in figure.note, figure.note
    # the DMFT's figures do not read a posterior's saddle as gradient descent's limit
    assert "posterior's saddle point" in limit_comparison(runs, out).skipped


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
