"""The after-training NTK across widths (Fig. 9), from AfterNTK."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_mup.report.after_ntk import compare_widths, draw_after_kernels
from lightning_mup.report.figures._common import Figure
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.runs import Run, by_width, groups, label


# ----------------------------------------------------------------------------------------- Fig. 9
@register_figure(
    order=6,
    key="after_ntk",
    title="After-training NTK averaged over seeds: spectrum, task power C(k), kernel flow (Fig. 9)",
    header=["group", "width", "runs", "λ₁", "λ₂", "C(10)", "C(20)", "kernel-flow loss (end)"],
    source=("AfterNTK", "after_ntk"),
)
def after_ntk(runs: Sequence[Run], figure: Figure):
    for group, members in groups(runs).items():
        # the runs themselves, not their last version folder: a resumed fit's arrays may sit in an earlier one
        folders = {w: [r for r in same if r.step_files("after_ntk")] for w, same in by_width(members).items()}
        folders = {w: f for w, f in folders.items() if f}
        if len(folders) < 2:
            continue
        result = compare_widths(folders)
        single = sorted(w for w, r in result.items() if r.runs < 2)
        if single:
            figure.caveats.append(
                f"one seed at N={', '.join(map(str, single))}: that kernel is one network's, not an average over "
                "initialisations (sweep --seeds 2 or more)"
            )
        figure.note = (
            "The NTK after training on the probe points, averaged over seeds per width: its eigenvalues, the "
            "share C(k) of the target in the top k eigenvectors, and the loss of gradient flow under the fixed "
            "kernel from the initial outputs."
        )
        for width, r in result.items():
            power = r.task_power
            figure.rows.append(
                [
                    label(group),
                    width,
                    r.runs,
                    float(r.eigenvalues[0]),
                    float(r.eigenvalues[1]),
                    float(power[min(9, len(power) - 1)]),
                    float(power[min(19, len(power) - 1)]),
                    float(r.flow_loss[-1]),
                ]
            )
        return draw_after_kernels(result)
    raise Skip()
