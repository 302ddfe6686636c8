"""Coordinate check: the first thing to run after parametrizing a model.

Train the model at several widths for a few steps (several seeds, a fixed batch) and record, for every
module, the typical size of its output coordinates, mean |h|, and of their change since init,
mean |h_t − h_0|. Under a correct μP both are flat in width after the first step (log-log slope ≈ 0);
under SP the readout grows ≈ width¹. A flat check is necessary, not sufficient: also check that the
optimal learning rate transfers across widths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_mup.parametrize.core import parametrize
from lightning_mup.parametrize.optim import scale_optimizer

SKIPPED_TYPES = (nn.Dropout, nn.Identity)
OUTPUT = "<output>"


@dataclass
class CoordCheck:
    """Sizes per module × width × recorded step (averaged over seeds) and their width slopes."""

    parametrization: str | None
    widths: list[int]
    modules: list[str]
    activation: np.ndarray  # [module, width, step] mean |h_t|
    change: np.ndarray  # [module, width, step] mean |h_t − h_0|
    losses: np.ndarray  # [width, step]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.activation.shape[2]

    def slopes(self, which: str = "activation") -> np.ndarray:
        """Log-log slope of size vs width at every recorded step, [module, step]; NaN where a size is 0."""
        sizes = getattr(self, which)
        return np.stack([_slope(self.widths, sizes[:, :, t]) for t in range(self.steps)], axis=1)

    def window_slopes(self, which: str = "activation", from_step: int = 1) -> dict[str, float]:
        """Slope of each module's size averaged over steps ``from_step`` onwards.

        The headline number: a wrong width exponent shows at every step, while single-step excursions
        (a logit crossing zero, a large-lr oscillation that happens one step earlier at one width) wash out.
        """
        sizes = getattr(self, which)[:, :, from_step:].mean(axis=2)
        return dict(zip(self.modules, _slope(self.widths, sizes).tolist()))

    def worst_slopes(self, which: str = "activation", from_step: int = 1) -> dict[str, float]:
        """Largest |slope| over the steps from ``from_step`` on, per module (NaN steps ignored)."""
        s = np.abs(self.slopes(which)[:, from_step:])
        return {m: float(np.nanmax(row)) if np.isfinite(row).any() else float("nan") for m, row in zip(self.modules, s)}

    def table(self) -> str:
        """One row per module: slopes of |h| and |Δh| at step 1, at the last step, and over steps ≥ 1."""
        act, chg = self.slopes("activation"), self.slopes("change")
        act_window, chg_window = self.window_slopes("activation"), self.window_slopes("change")
        worst = self.worst_slopes("activation")
        last = self.steps - 1
        header = (
            "module",
            "|h| t=1",
            f"|h| t={last}",
            "|h| t≥1",
            "|Δh| t=1",
            f"|Δh| t={last}",
            "|Δh| t≥1",
            "worst |h| step",
        )
        rows = [
            (
                name,
                *(
                    f"{v:+.3f}"
                    for v in (
                        act[i, 1],
                        act[i, last],
                        act_window[name],
                        chg[i, 1],
                        chg[i, last],
                        chg_window[name],
                        worst[name],
                    )
                ),
            )
            for i, name in enumerate(self.modules)
        ]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        title = (
            f"coordinate check ({self.parametrization or 'as built'}), widths {self.widths}: "
            "log-log slope of size vs width (0 = width-independent)"
        )
        lines = [title] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [header, *rows]]
        if any("nan" in v for r in rows for v in r[1:]):
            lines.append(
                "nan: that size is 0 at some width, so it has no slope — typically |Δh| at t=1 below a zero-"
                "initialised readout (μP's), which sends no gradient back in the first step"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        return plot_coord_checks([self], path, title)


def plot_coord_checks(checks: Sequence[CoordCheck], path: str | Path, title: str | None = None) -> Path:
    """One row per check, one column per recorded step (size vs width, log-log, a line per module)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({0, 1, checks[0].steps // 2, checks[0].steps - 1})
    fig, axes = plt.subplots(len(checks), len(steps), figsize=(3.2 * len(steps), 2.8 * len(checks)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, check in zip(axes, checks):
        for ax, t in zip(row, steps):
            for i, name in enumerate(check.modules):
                color = cmap(i / max(1, len(check.modules) - 1))
                ax.plot(check.widths, check.activation[i, :, t], marker="o", ms=3, color=color, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{check.parametrization or 'as built'} · step {t}", fontsize=9)
            ax.set_xlabel("width")
        row[0].set_ylabel("mean |h|")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=6, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def coord_check(
    make_model: Callable[[int], nn.Module],
    widths: Sequence[int],
    batch: Any,
    loss: Callable[[nn.Module, Any], torch.Tensor],
    *,
    parametrization: str | None = "mup",
    base_width: int | None = None,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
    lr: float = 0.1,
    other_lr: float | None = None,
    steps: int = 10,
    seeds: Sequence[int] = (0, 1, 2),
    modules: Sequence[str] | None = None,
    progress: bool = False,
    **parametrize_kwargs: Any,
) -> CoordCheck:
    """Train ``make_model(width)`` for ``steps`` steps at each width and measure coordinate sizes.

    Args:
        make_model: builds the model at a width (plain init; this function parametrizes it).
        widths: at least two widths; span ≥ 8× for a meaningful slope.
        batch: the fixed training batch, passed to ``loss``.
        loss: ``loss(model, batch) -> scalar``.
        parametrization: a form of :func:`parametrize` (base ``make_model(base_width)``), or
            ``None`` to train the models as built.
        optimizer: ``"sgd"``, ``"adam"``, ``"module"`` (the model's own ``configure_optimizers``, a LightningModule's:
            ``lr`` unused), a factory ``params -> Optimizer`` (given ``lr=``), or a Muon pair:
            ``"muon"`` (torch's Muon, ``adjust_lr_fn="original"``) / ``"muon_match_rms_adamw"`` on the hidden
            matrices at ``lr``, Adam on the rest at ``other_lr`` (default ``lr``).
        modules: module names to record (default: every leaf module except dropout/identity, and
            the model output).

    Example::

        check = coord_check(lambda w: MLP(in_dim=8, width=w), [64, 256, 1024],
                            batch=(x, y), loss=lambda m, b: F.mse_loss(m(b[0]), b[1]))
        print(check.table()); check.plot("coord_check.png")
    """
    widths = sorted(widths)
    if len(widths) < 2:
        raise ValueError("coord_check needs at least two widths")
    base_width = base_width or widths[0]
    delta_width = widths[-1] if widths[-1] != base_width else widths[0]
    make_optimizer = _optimizer_factory(optimizer)
    runs = [(w, s) for w in widths for s in seeds]
    iterator = _progress(runs, progress)
    activation: dict[str, np.ndarray] = {}
    change: dict[str, np.ndarray] = {}
    losses = np.zeros((len(widths), steps))
    names: list[str] | None = None
    for w, seed in iterator:
        torch.manual_seed(seed)
        model = make_model(w)
        if parametrization is not None:
            record = parametrize(
                model,
                base=lambda: make_model(base_width),
                delta=lambda: make_model(delta_width),
                parametrization=parametrization,
                # the coordinate check trains itself: the self-check's few steps would repeat it
                **{"check_optimizer": None, **parametrize_kwargs},
            )
        if optimizer in MUON_PAIRS:
            if parametrization is None:
                raise ValueError("a Muon pair needs the roles of a parametrization (parametrization='sp' for SP)")
            opt = _muon_pair(model, record, lr, other_lr if other_lr is not None else lr, MUON_PAIRS[optimizer])
        else:
            opt = _configured(model) if optimizer == "module" else make_optimizer(model.parameters(), lr=lr)
            if parametrization is not None:
                scale_optimizer(opt, record, model)
        names = names or _module_names(model, modules)
        act, chg, run_losses = _train_and_record(model, opt, batch, loss, steps, names)
        i = widths.index(w)
        for name in names:
            activation.setdefault(name, np.zeros((len(widths), steps)))[i] += act[name] / len(seeds)
            change.setdefault(name, np.zeros((len(widths), steps)))[i] += chg[name] / len(seeds)
        losses[i] += np.asarray(run_losses) / len(seeds)
    assert names is not None
    return CoordCheck(
        parametrization=parametrization,
        widths=list(widths),
        modules=names,
        activation=np.stack([activation[n] for n in names]),
        change=np.stack([change[n] for n in names]),
        losses=losses,
        settings={
            "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom"),
            "lr": lr,
            "seeds": list(seeds),
            "base_width": base_width,
            **parametrize_kwargs,
        },
    )


def _slope(widths: Sequence[int], sizes: np.ndarray) -> np.ndarray:
    """Least-squares slope of log(size) vs log(width) for each row of ``sizes`` [row, width]."""
    x = np.log(np.asarray(widths, dtype=float))
    x = x - x.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(sizes)
        out = (y - y.mean(axis=1, keepdims=True)) @ x / (x @ x)
    out[~np.isfinite(y).all(axis=1)] = np.nan
    return out


MUON_PAIRS = {"muon": "original", "muon_match_rms_adamw": "match_rms_adamw"}


class _Pair:
    """Two optimizers stepped as one (Muon on the hidden matrices, Adam on the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def _muon_pair(model, record, lr: float, other_lr: float, adjust_lr_fn: str) -> _Pair:
    from lightning_mup.parametrize.optim import muon_param_groups

    matrices, rest = muon_param_groups(model, record)
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, adjust_lr_fn=adjust_lr_fn)
    adam = torch.optim.Adam(rest, lr=other_lr)
    return _Pair(scale_optimizer(muon, record, model), scale_optimizer(adam, record, model))


def _optimizer_factory(optimizer):
    if optimizer in MUON_PAIRS or optimizer == "module":
        return None
    if optimizer == "sgd":
        return torch.optim.SGD
    if optimizer == "adam":
        return torch.optim.Adam
    if callable(optimizer):
        return optimizer
    raise ValueError(f"optimizer={optimizer!r}; use 'sgd', 'adam' or a factory params -> Optimizer")


def _configured(model: nn.Module) -> torch.optim.Optimizer:
    """The first optimizer a LightningModule's ``configure_optimizers`` returns (an optimizer, a list, a tuple of
    lists or a dict): the user's own, with its learning rate, that μP then scales."""
    found: Any = model.configure_optimizers()
    while not isinstance(found, torch.optim.Optimizer):
        if isinstance(found, dict):
            found = found["optimizer"]
        elif isinstance(found, (list, tuple)) and found:
            found = found[0]
        else:
            raise ValueError(f"configure_optimizers returned {type(found).__name__}: no optimizer to train with")
    return found


def _module_names(model: nn.Module, modules: Sequence[str] | None) -> list[str]:
    from lightning_mup._names import select

    all_names = [n for n, _ in model.named_modules() if n]
    if modules is not None:
        chosen = select(modules, all_names)
        if not chosen:
            raise ValueError(f"modules={list(modules)} match nothing; names look like {all_names[:8]}")
        return chosen
    leaves = [n for n, m in model.named_modules() if n and not list(m.children()) and not isinstance(m, SKIPPED_TYPES)]
    return [*leaves, OUTPUT]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    logits = getattr(value, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def _train_and_record(model, opt, batch, loss_fn, steps, names):
    modules = dict(model.named_modules())
    current: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, args, output):
            tensor = _first_tensor(output)
            if tensor is not None:
                current[name] = tensor.detach().float()

        return hook

    handles = [modules[n].register_forward_hook(recorder(n)) for n in names if n != OUTPUT]
    if OUTPUT in names:
        handles.append(model.register_forward_hook(recorder(OUTPUT)))
    act = {n: np.zeros(steps) for n in names}
    chg = {n: np.zeros(steps) for n in names}
    first: dict[str, torch.Tensor] = {}
    losses = []
    try:
        model.train()
        for t in range(steps):
            current.clear()
            opt.zero_grad(set_to_none=True)
            value = loss_fn(model, batch)
            for n in names:
                h = current.get(n)
                if h is None:
                    continue
                first.setdefault(n, h)
                act[n][t] = float(h.abs().mean())
                chg[n][t] = float((h - first[n]).abs().mean()) if h.shape == first[n].shape else float("nan")
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
    finally:
        for handle in handles:
            handle.remove()
    return act, chg, losses


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="coord check", unit="run")
