"""The paper's figures from a sweep's runs, one module per measured quantity (mirroring ``callbacks/``); each
figure returns a :class:`Figure` (PNG + the numbers behind it) or a :class:`Figure` with ``skipped`` saying why
there is none and what would provide the data. :mod:`._registry` owns the skipping, the caveats and the saving.

Titles say what is plotted. A conclusion appears only as a measured verdict with the numbers that decide
it, and what the data cannot carry (one member, one seed, a poor or degenerate fit, only the
initialisation measured) is a caveat printed on the figure and beside it. A new figure is a drawing function
``draw(runs, figure) -> matplotlib figure`` in the module of its quantity, decorated with
``@register_figure(order=..., key=..., title=..., header=..., source=...)``; it raises :class:`Skip` when there is
nothing to draw."""

from lightning_mup.report.figures._common import (
    LABELS,
    Figure,
    best_group_per_width,
    initial_only,
    loss_key,
    mean_final,
    no_data,
    pretty,
)
from lightning_mup.report.figures._registry import Skip, register_figure, registered
from lightning_mup.report.figures.after_ntk import after_ntk
from lightning_mup.report.figures.axes import axis_transfer, transfer_summary
from lightning_mup.report.figures.ensemble_logits import ensembles, logit_rmse
from lightning_mup.report.figures.feature_kernels import cka_to_widest
from lightning_mup.report.figures.limit import limit_comparison, limit_features, limit_posterior
from lightning_mup.report.figures.losses import MIN_R2, fit_caveats, loss_curves, width_scaling
from lightning_mup.report.figures.preactivations import preactivations
from lightning_mup.report.figures.sharpness import SHARPNESS_SERIES, sharpness
from lightning_mup.report.figures.transfer import (
    depth_transfer,
    loss_vs_depth,
    lr_transfer,
    optima_grid,
    transfer_verdict,
)
from lightning_mup.report.figures.update_sizes import UPDATE_QUANTITIES, UPDATE_SLOPE_FLAG, update_sizes

FIGURES = registered()  # every module above registered its figures on import

__all__ = [
    "FIGURES",
    "LABELS",
    "MIN_R2",
    "SHARPNESS_SERIES",
    "UPDATE_QUANTITIES",
    "UPDATE_SLOPE_FLAG",
    "Figure",
    "Skip",
    "after_ntk",
    "axis_transfer",
    "best_group_per_width",
    "cka_to_widest",
    "depth_transfer",
    "ensembles",
    "fit_caveats",
    "initial_only",
    "limit_comparison",
    "limit_features",
    "limit_posterior",
    "logit_rmse",
    "loss_curves",
    "loss_key",
    "loss_vs_depth",
    "lr_transfer",
    "mean_final",
    "no_data",
    "optima_grid",
    "preactivations",
    "pretty",
    "register_figure",
    "sharpness",
    "transfer_summary",
    "transfer_verdict",
    "update_sizes",
    "width_scaling",
]
