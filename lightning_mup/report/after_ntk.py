"""Ensemble-averaged after-kernels across widths: the data behind Vyas et al. Fig. 9b-c.

    from lightning_mup.report.after_ntk import compare_widths, plot_after_kernels
    result = compare_widths({64: ["runs/w64/s0", "runs/w64/s1"], 256: [...]})
    plot_after_kernels(result, "fig9.png")

Each run folder holds ``after_ntk/step_<step>.npz`` from the :class:`~lightning_mup.callbacks.AfterNTK`
callback; runs of one width (different seeds, same data and probe) are averaged as kernels, then the
average's spectrum, task power C(k) and kernel-flow loss are computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_mup._run_folder import PROBE_KEY, load_arrays, probe_of, run_step_files, version_folders
from lightning_mup.measure.spectrum import analyse_kernel
from lightning_mup.report.plotting import colors, pyplot, save
from lightning_mup.report.runs import Run


@dataclass
class AveragedKernel:
    runs: int
    kernel: np.ndarray
    eigenvalues: np.ndarray  # of K/P, descending
    task_power: np.ndarray  # C(k), k = 1..P
    flow_steps: np.ndarray
    flow_loss: np.ndarray


def _last_arrays(run: str | Path | Run, step: int | None) -> dict[str, np.ndarray]:
    """A run's after-kernel arrays at ``step`` (default: its last), over all its version folders (a resumed fit's
    last folder may hold none)."""
    files = run.step_files("after_ntk") if isinstance(run, Run) else run_step_files(version_folders(run), "after_ntk")
    if step is not None:
        files = {s: f for s, f in files.items() if s == step}
    if not files:
        raise FileNotFoundError(f"no after_ntk arrays{'' if step is None else f' at step {step}'} in {run}")
    return load_arrays(files[max(files)])


def _one_probe(runs: Sequence[str | Path | Run], step: int | None) -> list[dict[str, np.ndarray]]:
    """The runs' arrays, refused unless every run measured the same probe points."""
    arrays = [_last_arrays(r, step) for r in runs]
    probes = {probe_of(a) if PROBE_KEY in a else str(a["kernel"].shape) for a in arrays}
    if len(probes) != 1 or len({a["kernel"].shape for a in arrays}) != 1:
        raise ValueError(
            f"the after-kernels of {[str(getattr(r, 'folder', r)) for r in runs]} were measured on different probe "
            "points; averaging or comparing them needs one probe (the same data order and num_batches, or the same "
            "probe= batches)"
        )
    return arrays


def ensemble_after_kernel(runs: Sequence[str | Path | Run], step: int | None = None) -> AveragedKernel:
    """Average the runs' after-kernels (same probe points), then spectrum, C(k) and kernel flow."""
    return _averaged(_one_probe(runs, step))


def _averaged(arrays: list[dict[str, np.ndarray]]) -> AveragedKernel:
    kernel = np.mean([a["kernel"] for a in arrays], axis=0)
    first = arrays[0]
    initial_outputs = np.mean([a["initial_outputs"] for a in arrays], axis=0)
    result = analyse_kernel(kernel, first["targets"], initial_outputs, first["flow_steps"], float(first["lr"]))
    points = len(result.kernel)
    return AveragedKernel(
        len(arrays), kernel, result.eigenvalues / points, result.task_power, first["flow_steps"], result.flow_loss
    )


def compare_widths(
    runs_by_width: Mapping[int, Sequence[str | Path | Run]], step: int | None = None
) -> dict[int, AveragedKernel]:
    """Per width, the seed-averaged after-kernel; every run of every width must share one probe."""
    widths = sorted(runs_by_width)
    arrays = _one_probe([r for w in widths for r in runs_by_width[w]], step)
    out, start = {}, 0
    for width in widths:
        count = len(runs_by_width[width])
        out[width] = _averaged(arrays[start : start + count])
        start += count
    return out


def plot_after_kernels(
    results: Mapping[int, AveragedKernel],
    path: str | Path,
    top: int = 60,
    title: str | None = None,
    caveats: Sequence[str] = (),
) -> Path:
    """:func:`draw_after_kernels` saved as a PNG at ``path``."""
    return save(draw_after_kernels(results, top), path, title, caveats)


def draw_after_kernels(results: Mapping[int, AveragedKernel], top: int = 60):
    """Spectra (b), task power C(k) (c) and kernel-flow loss curves, one line per width."""
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.8))
    for color, (width, r) in zip(colors(len(results)), results.items()):
        k = np.arange(1, min(top, len(r.eigenvalues)) + 1)
        axes[0].loglog(k, np.clip(r.eigenvalues[: len(k)], 1e-12, None), color=color, label=f"N={width}")
        axes[1].semilogx(np.arange(1, len(r.task_power) + 1), r.task_power, color=color, label=f"N={width}")
        axes[2].plot(r.flow_steps, r.flow_loss, color=color, label=f"N={width}")
    axes[0].set(xlabel="k", ylabel="eigenvalue λ_k of ⟨K⟩/P", title="ensemble-averaged after-NTK spectrum")
    axes[1].set(xlabel="k", ylabel="C(k)", title="cumulative task power")
    axes[2].set(
        xlabel="kernel-flow time (gradient-descent steps of size η)",
        ylabel="loss on the probe points",
        title="gradient flow under the fixed ⟨K⟩",
        yscale="log",
    )
    for ax in axes:
        ax.legend(fontsize=8, frameon=False)
    return fig
