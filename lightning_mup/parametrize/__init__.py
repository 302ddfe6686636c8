"""Pure-torch core: roles from shapes, the parameterization table, and applying it (no Lightning)."""

from lightning_mup.families import register_block, register_layer
from lightning_mup.parametrize.axes import RunSize, apply_axis_rules
from lightning_mup.parametrize.coord_check import CoordCheck, coord_check, plot_coord_checks
from lightning_mup.parametrize.core import parametrize
from lightning_mup.parametrize.langevin import Langevin
from lightning_mup.parametrize.optim import (
    declare_optimizer_family,
    effective_lrs,
    muon_param_groups,
    optimizer_family,
    scale_optimizer,
    scaling_param_groups,
)
from lightning_mup.parametrize.record import ModuleHook, Parametrization, ParamScale
from lightning_mup.parametrize.settings import MuPSettings
from lightning_mup.parametrize.table import FORMS

__all__ = [
    "FORMS",
    "CoordCheck",
    "Langevin",
    "ModuleHook",
    "MuPSettings",
    "ParamScale",
    "Parametrization",
    "RunSize",
    "apply_axis_rules",
    "coord_check",
    "declare_optimizer_family",
    "effective_lrs",
    "muon_param_groups",
    "optimizer_family",
    "parametrize",
    "plot_coord_checks",
    "register_block",
    "register_layer",
    "scale_optimizer",
    "scaling_param_groups",
]
