"""Report figures from hand-made runs: the learning-rate optimum, diverged runs and the final-loss window."""

from pathlib import Path

import numpy as np
import pytest

from lightning_mup.report.figures import best_group_per_width, lr_transfer, width_scaling
from lightning_mup.report.runs import Run


def _run(width, lr, values, form="mup", seed=0):
    steps = np.arange(1, len(values) + 1) * 100
    return Run(
        f"w{width}_s{seed}_lr{lr}_{form}",
        Path("."),
        Path("."),
        width,
        seed,
        lr,
        form,
        {"val_loss": (steps, np.asarray(values, dtype=float))},
    )


def _curve(final):
    return [5.0] * 9 + [final]  # only the last value lies in the final 10% of training


def _grid(optimum_of_width, form):
    lrs = [0.1, 0.2, 0.4, 0.8]
    return [
        _run(w, lr, _curve(1.0 / w + abs(np.log2(lr / optimum_of_width(w))) if lr != 0.8 or w < 256 else np.nan), form)
        for w in (64, 128, 256, 512)
        for lr in lrs
    ]


def test_lr_transfer_finds_each_optimum_and_never_picks_a_diverged_run(tmp_path):
    runs = _grid(lambda w: 0.8 if w < 256 else 0.4, "mup") + _grid(lambda w: 0.4 * 64 / w * 2, "sp")
    figure = lr_transfer(runs, tmp_path)
    best = {(form, width): lr for form, width, lr, _ in figure.rows}
    # at 256 and 512 the lr 0.8 diverged (NaN): the optimum falls back to the best finite one
    assert [best["mup", w] for w in (64, 128, 256, 512)] == [0.8, 0.8, 0.4, 0.4]
    assert [best["sp", w] for w in (64, 128, 256, 512)] == [0.8, 0.4, 0.2, 0.1]
    assert (
        "mup: best lr 0.8 at N=64 → 0.4 at N=512, spread 1 grid step(s); loss at the best lr non-increasing"
        in figure.note
    )
    assert "sp: best lr 0.8 at N=64 → 0.1 at N=512, spread 3 grid step(s)" in figure.note
    assert figure.path.stat().st_size > 10_000


def test_final_loss_is_the_last_tenth_of_training_and_nan_if_diverged():
    run = _run(64, 0.1, [9.0] * 18 + [2.0, 4.0])
    assert run.final("val_loss") == pytest.approx(3.0)  # steps 1900 and 2000
    assert np.isnan(_run(64, 0.1, [1.0] * 19 + [np.nan]).final("val_loss"))
    assert run.final("train_loss") is None


def test_best_lr_per_width_averages_seeds_and_feeds_the_width_fit(tmp_path):
    runs = [
        _run(w, lr, _curve(2.0 * w**-0.5 + 0.1 + (lr - 0.2) ** 2 + 0.01 * seed), seed=seed)
        for w in (64, 128, 256, 512)
        for lr in (0.1, 0.2, 0.4)
        for seed in (0, 1)
    ]
    chosen = best_group_per_width(runs, "val_loss")
    assert {g: {r.lr for r in m} for g, m in chosen.items()} == {("mup", "best", ()): {0.2}}
    assert len(chosen["mup", "best", ()]) == 8  # 4 widths × 2 seeds
    (row,) = width_scaling(runs, tmp_path).rows
    assert row[1:4] == pytest.approx([2.0, 0.5, 0.105], rel=1e-3)  # C, β, D (D = 0.1 + mean seed offset)


def test_report_of_a_folder_without_runs_says_so(tmp_path, capsys):
    from lightning_mup.report.page import main as report

    with pytest.raises(SystemExit):
        report([str(tmp_path)])
    assert "holds no finished runs" in capsys.readouterr().err


def test_a_fit_the_data_cannot_carry_is_drawn_with_its_caveats(tmp_path):
    """Three widths of a 20-step sweep: β runs to its bound and three parameters fit three points."""
    runs = [_run(w, 0.1, _curve(loss)) for w, loss in ((64, 0.388), (128, 0.359), (256, 0.362))]
    figure = width_scaling(runs, tmp_path)
    text = " ".join(figure.caveats)
    assert "three parameters fitted to 3 widths" in text and "at its bound" in text
    assert figure.rows[0][-1] != "none"
    clean = [_run(w, 0.1, _curve(2.0 * w**-0.5 + 0.1)) for w in (64, 128, 256, 512, 1024)]
    assert width_scaling(clean, tmp_path).caveats == []


def _folder_run(folder: Path, width: int) -> Run:
    """A one-seed, 20-step run whose files live in ``folder`` (a version_* folder)."""
    return Run(
        f"w{width}_s0",
        folder.parent,
        [folder],
        width,
        0,
        None,
        "mup",
        {"train_loss": (np.arange(1.0, 21), np.ones(20))},
    )


def test_an_ensemble_of_one_is_not_drawn(tmp_path):
    from lightning_mup.report.figures import ensembles

    runs = []
    for width in (64, 128):
        folder = tmp_path / f"w{width}" / "version_0"
        (folder / "ensemble_logits").mkdir(parents=True)
        rng = np.random.default_rng(width)
        np.savez(
            folder / "ensemble_logits" / "step_00000020.npz",
            logits=rng.normal(size=(1, 8, 1)),
            targets=rng.normal(size=8),
        )
        runs.append(_folder_run(folder, width))
    figure = ensembles(runs, tmp_path)
    assert figure.path is None and "--seeds 2" in figure.skipped and figure.rows == []


def test_a_callback_in_the_recipe_whose_cadence_outlasts_the_runs_is_named(tmp_path):
    from lightning_mup.report.figures import no_data

    runs = []
    for width in (64, 128):
        folder = tmp_path / f"w{width}" / "version_0"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(
            "trainer:\n  callbacks:\n  - class_path: lightning_mup.callbacks.FeatureKernels\n"
            "    init_args: {every_n_steps: 500}\n"
        )
        runs.append(_folder_run(folder, width))
    message = no_data(runs, "FeatureKernels", "feature_kernels")
    assert "FeatureKernels is in the recipe" in message and "every_n_steps=500" in message and "20 steps" in message
    assert "add the AfterNTK callback" in no_data(runs, "AfterNTK", "after_ntk")
    assert "one width" in no_data(runs[:1], "FeatureKernels", "feature_kernels")


def test_a_layer_whose_update_grows_with_width_is_flagged(tmp_path):
    from lightning_mup.report.figures import update_sizes

    runs = []
    for w in (64, 128, 256):
        run = _run(w, None, _curve(0.1))
        steps = np.asarray([10.0, 20.0])
        for quantity in ("dW_x", "W_dx", "spectral"):
            run.metrics[f"update_sizes/net.0/{quantity}"] = (steps, np.full(2, 0.3))  # flat: μP
            run.metrics[f"update_sizes/net.2/{quantity}"] = (steps, np.full(2, 0.3 * w / 64))  # grows ∝ N
        runs.append(run)
    figure = update_sizes(runs, tmp_path)
    slopes = {(row[1], row[2]): row[3] for row in figure.rows}
    assert slopes[("net.0", "dW_x")] == pytest.approx(0.0, abs=1e-9)
    assert slopes[("net.2", "spectral")] == pytest.approx(1.0)
    assert "3 layer quantities scale with width" in figure.note and "net.2 dW_x ∝ N^+1.00" in figure.note


def test_the_registry_owns_the_skip_reason_the_saving_and_a_figure_s_failure(tmp_path, monkeypatch):
    from lightning_mup.report.figures import _registry
    from lightning_mup.report.figures._registry import Skip, register_figure
    from lightning_mup.report.plotting import pyplot

    monkeypatch.setattr(_registry, "_REGISTERED", [])
    runs = [_run(64, 0.1, _curve(1.0)), _run(64, 0.1, _curve(0.9), seed=1)]

    @register_figure(order=2, key="drawn", title=lambda rs: f"{len(rs)} runs", header=["a"])
    def drawn(runs, figure):
        figure.rows.append([1.0])
        figure.caveats.append("only a test")
        return pyplot().subplots()[0]

    @register_figure(order=0, key="nothing", title="t", source=("FeatureKernels", "feature_kernels"))
    def nothing(runs, figure):
        figure.rows.append([1.0])  # half-way: the rows of a skipped figure are dropped, its plot closed
        pyplot().subplots()
        raise Skip()

    @register_figure(order=1, key="broken", title="t")
    def broken(runs, figure):
        raise ZeroDivisionError("boom")

    assert [f.__name__ for f in _registry.registered()] == ["nothing", "broken", "drawn"]
    users = pyplot().figure()  # a figure the caller has open stays open
    made = drawn(runs, tmp_path)
    assert made.title == "2 runs" and made.path == tmp_path / "drawn.png" and made.path.exists()
    assert made.caveats == ["only a test"] and made.skipped is None
    skipped = nothing(runs, tmp_path)
    assert skipped.path is None and skipped.rows == [] and "one width (N=64)" in skipped.skipped
    failed = broken(runs, tmp_path)
    assert failed.skipped == "failed: ZeroDivisionError: boom" and not (tmp_path / "broken.png").exists()
    assert pyplot().get_fignums() == [users.number]
    pyplot().close(users)
    with pytest.raises(ValueError, match="figure place 2 is drawn's"):
        register_figure(order=2, key="other", title="t")(lambda runs, figure: None)
