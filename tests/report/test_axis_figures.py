"""The report along any grid axis: the optimum per batch size (and the best (η, λ) pair), a verdict per axis."""

from pathlib import Path

import numpy as np

from lightning_mup.report.figures import axis_transfer, transfer_summary
from lightning_mup.report.runs import Run

LRS = [0.001, 0.002, 0.004, 0.008, 0.016]
DECAYS = [0.01, 0.1, 1.0]


def _run(lr, final, seed=0, width=64, **axes):
    steps = np.arange(1, 11) * 100
    values = np.asarray([5.0] * 9 + [final])
    name = "_".join(f"{k}{v}" for k, v in axes.items()) + f"_w{width}_lr{lr}_s{seed}"
    return Run(name, Path("."), [Path(".")], width, seed, lr, "mup", {"val_loss": (steps, values)}, axes=axes)


def _batch_sweep():
    """Without a rule the optimum moves one lr step per 4× batch (√B); with the sqrt rule it stays at 0.004.
    Larger batches reach a lower loss; the second seed adds noise smaller than the steps between lrs."""
    runs = []
    for rule in ("null", "sqrt"):
        for batch in (16, 64, 256):
            best = 0.004 if rule == "sqrt" else 0.004 * (batch / 64) ** 0.5
            for lr in LRS:
                for seed in (0, 1):
                    loss = 1.0 / np.log2(batch) + 0.1 * np.log2(lr / best) ** 2 + 0.001 * seed
                    runs.append(_run(lr, loss, seed, batch_rule=rule, batch_size=str(batch)))
    return runs


def test_the_optimum_per_batch_size_with_the_rule_and_without(tmp_path):
    figure = axis_transfer(_batch_sweep(), tmp_path)
    best = {(setting, value): lr for axis, setting, value, lr, _, _ in figure.rows}
    assert [best["mup, width=64, batch_rule=sqrt", b] for b in (16, 64, 256)] == [0.004] * 3
    assert [best["mup, width=64, batch_rule=null", b] for b in (16, 64, 256)] == [0.002, 0.004, 0.008]
    assert (
        "mup, width=64, batch_rule=sqrt, batch_size 16 → 256: lr 0.004 → lr 0.004; the best lr moves by 0 grid step(s)"
        in figure.note
    )
    assert "batch_rule=null, batch_size 16 → 256: lr 0.002 → lr 0.008; the best lr moves by 2" in figure.note
    assert figure.path.stat().st_size > 10_000

    summary = transfer_summary(_batch_sweep(), tmp_path)
    spread = {(row[0], row[1]): row[4] for row in summary.rows}
    assert spread == {
        ("batch_size", "mup, width=64, batch_rule=null"): 2,
        ("batch_size", "mup, width=64, batch_rule=sqrt"): 0,
    }
    assert summary.note.startswith("1 of 2 panel(s) keep the optimum within one grid step")


def test_weight_decay_is_tuned_with_the_lr_and_the_optimum_is_a_pair(tmp_path):
    """Across widths the best λ moves two steps, the best η none; a wider network at its optimum is worse at
    width 256 (said), and the weight decay is never mistaken for an axis of its own."""
    runs = []
    for width, best_decay, floor in ((64, 0.01, 0.5), (128, 0.1, 0.4), (256, 1.0, 0.45)):
        for lr in LRS:
            for decay in DECAYS:
                loss = floor + 0.1 * np.log2(lr / 0.004) ** 2 + 0.1 * np.log10(decay / best_decay) ** 2
                runs.append(_run(lr, loss, width=width, weight_decay=str(decay)))
    summary = transfer_summary(runs, tmp_path)
    assert [row[:2] for row in summary.rows] == [["width", "mup"]]
    assert summary.rows[0][4:6] == [0, 2] and "the loss at the optimum gets worse with width" in summary.note
    assert any("edge of the grid for mup width=64, mup width=256" in c for c in summary.caveats)
    assert "(η=0.004, λ=0.01) → (η=0.004, λ=1); the best lr moves by 0 grid step(s) and the best weight decay by 2" in (
        summary.note
    )
    drawn = axis_transfer(runs, tmp_path)  # width is drawn here when the optimum is an (η, λ) pair
    assert [(row[0], row[2], row[3], row[4]) for row in drawn.rows] == [
        ("width", 64, 0.004, 0.01),
        ("width", 128, 0.004, 0.1),
        ("width", 256, 0.004, 1.0),
    ]


def test_a_move_the_seeds_cannot_resolve_is_said(tmp_path):
    """At batch 256 the optimum (lr 0.008) beats lr 0.002 by less than the seeds' spread: the optimum moves two
    grid steps from batch 16's, but the seeds cannot rule out it staying put — the verdict gives both."""
    losses = {16: [0.9, 0.5, 0.9, 0.9, 0.9], 256: [0.9, 0.52, 0.9, 0.5, 0.9]}
    runs = [
        _run(lr, loss + spread, seed, batch_size=str(batch))
        for batch, row in losses.items()
        for lr, loss in zip(LRS, row)
        for seed, spread in ((0, -0.05), (1, 0.05))
    ]
    summary = transfer_summary(runs, tmp_path)
    assert summary.rows[0][4] == 2
    assert "the best lr moves by 2 grid step(s) (at least 0 within the seeds' spread)" in summary.note
