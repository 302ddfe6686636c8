"""Feature kernels against the widest run (Fig. 5), from FeatureKernels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lightning_mup.measure.kernels import cka
from lightning_mup.report.figures._common import Figure, initial_only
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.plotting import colors, pyplot, width_axis
from lightning_mup.report.runs import Run, by_width, groups, label


# ----------------------------------------------------------------------------------------- Fig. 5
@register_figure(
    order=2,
    key="cka_to_widest",
    title="Debiased CKA of each layer's feature kernel to the widest run (Fig. 5c)",
    header=["group", "layer", "width", "CKA to widest"],
    source=("FeatureKernels", "feature_kernels"),
)
def cka_to_widest(runs: Sequence[Run], figure: Figure):
    for group, members in groups(runs).items():
        widths = by_width(members)
        if len(widths) < 2:
            continue
        widest = max(widths)
        reference_files = widths[widest][0].step_files("feature_kernels")
        if not reference_files:
            continue
        step = max(reference_files)
        reference_arrays = widths[widest][0].arrays("feature_kernels", step)
        if reference_arrays is None:
            continue
        reference = {k: v for k, v in reference_arrays.items() if k.startswith("phi/")}
        values: dict[str, dict[int, float]] = {}
        for width, same in widths.items():
            for run in same:
                data = run.arrays("feature_kernels", step) if run is not widths[widest][0] else None
                if data is None or not run.same_probe(data, reference_arrays, step):
                    continue
                for key, ref in reference.items():
                    if key in data and data[key].shape == ref.shape:
                        values.setdefault(key[4:], {}).setdefault(width, []).append(
                            cka(torch.as_tensor(data[key]), torch.as_tensor(ref))
                        )
        if not values:
            continue
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        lowest = 1.0
        for color, (layer, per_width) in zip(colors(len(values)), values.items()):
            ws = sorted(per_width)
            means = [float(np.mean(per_width[w])) for w in ws]
            lowest = min(lowest, *means)
            ax.semilogx(ws, means, "o-", color=color, label=layer)
            figure.rows += [[label(group), layer, w, m] for w, m in zip(ws, means)]
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="1 = the same kernel up to scale")
        ax.set_ylim(lowest - 0.15 * (1.0 - lowest) - 1e-3, 1.0 + 0.1 * (1.0 - lowest) + 1e-3)
        ax.set(xlabel="width N", ylabel=f"debiased CKA to N={widest}", title=f"{label(group)}, step {step}")
        width_axis(ax, widths)
        ax.legend(fontsize=7, frameon=False)
        figure.note = (
            f"Each run's feature kernel (probe points × probe points) against the first seed at N={widest}, "
            f"at step {step}, averaged over seeds; at N={widest} itself the value is the agreement between seeds."
        )
        if len(widths[widest]) < 2:
            figure.caveats.append(f"one seed at N={widest}: no seed-to-seed reference point at the widest width")
        figure.caveats += initial_only(runs, "FeatureKernels", step)
        return fig
    raise Skip()
