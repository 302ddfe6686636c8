"""The networks against the computed infinite-width limit (lightning-mup limit)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch

from lightning_mup._run_folder import LIMIT_FILE, load_arrays, probe_of
from lightning_mup.measure.distribution import histogram
from lightning_mup.measure.ensemble import (
    distance_to_reference,
    resolved_widths,
)
from lightning_mup.measure.kernels import cka
from lightning_mup.report.figures._common import Figure, _mean_curve, pretty
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.plotting import colors, pyplot, width_axis
from lightning_mup.report.runs import Run, by_width


# ------------------------------------------------------------------------------ the infinite-width limit
def _limit_and_runs(runs: Sequence[Run], figure: Figure, kind: str = "dmft") -> tuple[dict, dict, list[Run]]:
    """The sweep's ``limit.npz`` and the runs of its recipe (:class:`Skip` says which is missing). A run of
    another configuration (an axis, parametrization or lr the limit is not of) is left out. ``kind``: the DMFT of
    gradient descent, or a Langevin recipe's posterior saddle ("statics") — each figure draws its own."""
    sweep = runs[0].folder.parent if runs else None
    path = sweep / LIMIT_FILE if sweep is not None else None
    if path is None or not path.exists():
        raise Skip("no limit.npz in the sweep folder — lightning-mup limit --config <recipe> --out <sweep>")
    from lightning_mup._run_folder import recipe_fingerprint
    from lightning_mup.parametrize.settings import MuPSettings

    limit = load_arrays(path)
    settings = json.loads(str(limit["settings"]))
    found = settings.get("kind", "dmft")
    if found != kind:
        raise Skip(
            "limit.npz is a Langevin posterior's saddle point: drawn in 'limit_posterior'"
            if found == "statics"
            else "limit.npz is gradient descent's DMFT, not a posterior's saddle point: drawn in 'limit_comparison'"
        )
    matching = [r for r in runs if recipe_fingerprint(r.config, MuPSettings.LIMIT_FIELDS) == settings["fingerprint"]]
    if not matching:
        raise Skip(
            f"no run of the sweep has the configuration limit.npz was computed for ({settings['config']}: its "
            "data, model but the width, optimizer, μP form and steps) — rerun lightning-mup limit on the sweep's recipe"
        )
    if len(matching) < len(runs):
        figure.caveats.append(
            f"{len(runs) - len(matching)} of {len(runs)} runs have another configuration than the limit's: left out"
        )
    return limit, settings, matching


@register_figure(
    order=14,
    key="limit_features",
    title="Preactivations and feature kernels against the infinite-width limit",
    header=["width", "seeds", "layer", "KS to the limit", "CKA to the limit"],
)
def limit_features(runs: Sequence[Run], figure: Figure):
    """What the callbacks measured at the last step against the limit's: each hidden layer's preactivations
    (pooled over seeds, neurons and training points) with the limit's single-site density, and the seed-mean
    final feature kernels Φ^ℓ on the training points against the limit's (CKA). Needs the recipe's
    PreactivationHistograms / FeatureKernels at the last step on the full training batch (the limit's points)."""
    limit, settings, matching = _limit_and_runs(runs, figure)
    if "preactivations_train_final" not in limit or "probe_fingerprint" not in settings:
        raise Skip("limit.npz has no training-point samples (an older lightning-mup limit): rerun it")
    final, layers = int(settings["steps"]), len(limit["preactivations_train_final"])
    measured: dict[str, dict[int, list[dict]]] = {"preactivations": {}, "feature_kernels": {}}
    elsewhere = 0
    for run in matching:
        for callback in measured:
            arrays = run.arrays(callback, final)
            if arrays is None:
                continue
            if probe_of(arrays) != settings["probe_fingerprint"]:
                elsewhere += 1  # other points than the limit's training set: no comparison
                continue
            measured[callback].setdefault(run.width, []).append(arrays)
    if elsewhere:
        figure.caveats.append(
            f"{elsewhere} measurement(s) were taken on other points than the limit's training set (probe "
            "fingerprints differ): left out — measure on the full training batch (the default probe in full batch)"
        )
    if not measured["preactivations"] and not measured["feature_kernels"]:
        raise Skip(
            f"no run measured preactivations or feature kernels at the last step ({final}) on the training set — add "
            f"PreactivationHistograms and FeatureKernels with every_n_steps={final} to the recipe, as "
            "recipes/gegenbauer_limit.yaml does"
        )
    from scipy.stats import ks_2samp

    train = len(limit["feature_kernels_train_final"][0])

    def per_layer(arrays: dict, prefix: str) -> list[str]:
        """The layers' keys, if there are the limit's many and each covers every training point (the histogram
        callback records only its first ``points`` of the probe: fewer would be compared with all of them)."""
        keys = [k for k in arrays if k.startswith(prefix)]
        return keys if len(keys) == layers and all(len(arrays[k]) == train for k in keys) else []

    ks: dict[int, list[float]] = {}
    pooled_widest: list[np.ndarray] = []
    for width, members in sorted(measured["preactivations"].items()):
        keys = per_layer(members[0], "samples/")
        if not keys:
            figure.caveats.append(
                f"N = {width}: the preactivations are not of the limit's {layers} layers on all {train} training "
                f"points (PreactivationHistograms(points={train})): not compared"
            )
            continue
        pooled = [np.concatenate([m[k].reshape(-1) for m in members]) for k in keys]
        ks[width] = [float(ks_2samp(p, lim).statistic) for p, lim in zip(pooled, limit["preactivations_train_final"])]
        pooled_widest, edges = pooled, members[0]["edges"]
    alignment: dict[int, list[float]] = {}
    for width, members in sorted(measured["feature_kernels"].items()):
        keys = per_layer(members[0], "phi/")
        if not keys:
            figure.caveats.append(
                f"N = {width}: the feature kernels are not of the limit's {layers} layers on its {train} training "
                "points: not compared"
            )
            continue
        means = [np.mean([m[k] for m in members], axis=0) for k in keys]
        alignment[width] = [
            cka(torch.as_tensor(mean), torch.as_tensor(lim), debiased=False)
            for mean, lim in zip(means, limit["feature_kernels_train_final"])
        ]
    nan = float("nan")
    for width in sorted(set(ks) | set(alignment)):
        seeds = max(len(measured[c].get(width, [])) for c in measured)
        for layer in range(layers):
            figure.rows.append(
                [
                    width,
                    seeds,
                    layer + 1,
                    ks.get(width, [nan] * layers)[layer],
                    alignment.get(width, [nan] * layers)[layer],
                ]
            )
    plt = pyplot()
    fig, axes = plt.subplots(1, layers + 1, figsize=(4.6 * (layers + 1), 3.6))
    if pooled_widest:
        widest = max(ks)
        for layer, ax in enumerate(axes[:layers]):
            ax.hist(pooled_widest[layer], bins=edges, density=True, alpha=0.5, label=f"N = {widest}, pooled neurons")
            ax.hist(
                limit["preactivations_train_final"][layer],
                bins=edges,
                density=True,
                histtype="step",
                color="black",
                lw=1.5,
                label=f"limit (KS {ks[widest][layer]:.3f})",
            )
            ax.set(xlabel=f"h^{layer + 1} at step {final}", ylabel="density", title=f"Layer {layer + 1} preactivations")
            ax.legend(fontsize=7, frameon=False)
    else:
        for ax in axes[:layers]:
            ax.set_visible(False)
    if alignment:
        sizes = sorted(alignment)
        for layer in range(layers):
            axes[-1].plot(sizes, [1 - alignment[n][layer] for n in sizes], "o-", label=f"layer {layer + 1}")
        axes[-1].set(
            xscale="log",
            yscale="log",
            xlabel="width N",
            ylabel="1 − CKA(Φ, limit's Φ)",
            title="Final feature kernels against the limit's",
        )
        axes[-1].legend(fontsize=7, frameon=False)
        width_axis(axes[-1], sizes)
    else:
        axes[-1].set_visible(False)
    worst_ks = max((max(v) for v in ks.values()), default=nan)
    worst_cka = min((min(v) for v in alignment.values()), default=nan)
    figure.note = (
        f"At the last step ({final}), on the {train} training points: the "
        f"largest KS distance of a width's pooled preactivations to the limit's single-site density {worst_ks:.3f}, "
        f"the smallest CKA of a width's seed-mean feature kernel to the limit's {worst_cka:.4f}."
    )
    samples = len(limit["preactivations_train_final"][0])
    if samples < 5000:
        figure.caveats.append(
            f"the limit's density from {samples} samples: a KS below ~{1.4 / np.sqrt(samples):.2f} is its noise"
        )
    return fig


def _prediction_distances(limit: dict, settings: dict, widths: dict, figure: Figure) -> dict[int, tuple]:
    """Per width: the seed-mean last-step predictions' RMS distance to the limit's on the training points, that
    distance with the seed mean's and the limit's sampling variances subtracted in square (NaN where they explain
    it all), and that noise — from the runs' EnsembleLogits on the limit's own training set."""
    final, train = int(settings["steps"]), int(settings.get("train_points", 0))
    if "probe_fingerprint" not in settings or not train:
        return {}
    target = limit["outputs"][final, :train]
    limit_var = limit["outputs_error"][final, :train] ** 2
    distances, elsewhere = {}, 0
    for width, same in widths.items():
        members = []
        for run in same:
            arrays = run.arrays("ensemble_logits", final)
            if arrays is None:
                continue
            if probe_of(arrays) != settings["probe_fingerprint"]:
                elsewhere += 1
                continue
            members.append(arrays["logits"][..., 0])  # [members, points]: one output
        stacked = np.concatenate(members) if members else np.zeros((0, 0))
        if len(stacked) < 2 or stacked.shape[1] != train:
            continue
        distances[width] = distance_to_reference(stacked, target, limit_var)
    if elsewhere:
        figure.caveats.append(
            f"{elsewhere} run(s) recorded predictions on other points than the limit's training set: left out"
        )
    return distances


@register_figure(
    order=13,
    key="limit_comparison",
    title="Finite widths against the infinite-width limit (DMFT)",
    header=["width", "seeds", "final training loss", "limit", "|mean − limit|"],
)
def limit_comparison(runs: Sequence[Run], figure: Figure):
    """Every width against the computed limit (``lightning-mup limit`` wrote ``limit.npz`` into the sweep):
    training and validation loss curves with the limit drawn in, and the distance of each width's seed-mean
    final loss to the limit against N with its fitted slope (theory: ∝ 1/N), next to the limit's own error."""
    limit, settings, matching = _limit_and_runs(runs, figure)
    widths = by_width(matching)
    plt = pyplot()
    fig, (train_ax, test_ax, distance_ax) = plt.subplots(1, 3, figsize=(15, 3.8))
    steps = np.arange(len(limit["loss"]))
    deviations, sizes, errors = [], [], []
    for color, (width, same) in zip(colors(len(widths)), widths.items()):
        for ax, key in ((train_ax, "train_loss"), (test_ax, "val_loss")):
            curve = _mean_curve(same, key)
            if curve is not None:
                # train_loss at step k is the loss before update k; Lightning logs the validation that follows
                # update k at step k too, so it is the limit's step k + 1
                shift = 1 if key == "val_loss" else 0
                ax.plot(curve[0] + shift, curve[1], color=color, label=f"N={width} ({len(same)} seeds)")
        curve = _mean_curve(same, "train_loss")
        if curve is None:
            continue
        final_step = int(curve[0][-1])
        if final_step < len(limit["loss"]):
            deviation = abs(float(curve[1][-1]) - float(limit["loss"][final_step]))
            deviations.append(deviation)
            sizes.append(width)
            errors.append(float(2 * limit["loss_error"][final_step]))
            figure.rows.append([width, len(same), float(curve[1][-1]), float(limit["loss"][final_step]), deviation])
    band = 2 * limit["loss_error"]
    train_ax.plot(steps, limit["loss"], "k--", lw=2, label="limit (DMFT)")
    train_ax.fill_between(steps, limit["loss"] - band, limit["loss"] + band, color="grey", alpha=0.3)
    test_ax.plot(steps, limit["test_loss"], "k--", lw=2, label="limit (DMFT)")
    for ax, key in ((train_ax, "train_loss"), (test_ax, "val_loss")):
        ax.set(xlabel="gradient-descent step", ylabel=pretty(key), yscale="log", title=pretty(key).capitalize())
        ax.legend(fontsize=7, frameon=False)
    error = max(errors) if errors else float("nan")  # the limit's 2σ at the steps compared
    predictions = _prediction_distances(limit, settings, widths, figure)
    if len(predictions) >= 2:
        ns = sorted(predictions)
        distance_ax.loglog(
            ns, [predictions[n][1] for n in ns], "s-", label="|seed-mean predictions − limit|, noise removed"
        )
        distance_ax.loglog(ns, [predictions[n][2] for n in ns], "s:", lw=1, label="their noise (seed mean + limit)")
    if len(sizes) >= 2:
        distance_ax.loglog(sizes, deviations, "o-", label="|seed-mean final loss − limit|")
        distance_ax.axhline(error, color="grey", ls=":", label=f"the limit's error (2σ = {error:.1e})")
        slope = float(np.polyfit(np.log(sizes), np.log(np.maximum(deviations, 1e-300)), 1)[0])
        distance_ax.set(xlabel="width N", ylabel="distance to the limit", title=f"fitted slope {slope:.2f} (theory −1)")
        distance_ax.legend(fontsize=7, frameon=False)
        width_axis(distance_ax, sizes)
        figure.note = (
            f"The limit of {settings['config']} (depth {settings['depth']}, {settings['activation']}, γ0 = "
            f"{settings['gamma0']:g}, η0 = {settings['lr']:g}, {settings['replicas']} replicas × {settings['samples']} "
            f"samples) against the sweep's seed means. Distance of the final training loss to the limit against width: "
            f"fitted slope {slope:.2f} (theory: −1 for seed-averaged quantities)."
        )
        if predictions:
            # from the narrowest width on, while the distance stands clear of the noise (1% test)
            resolved = resolved_widths(predictions, entries=int(settings["train_points"]))
            figure.note += " Seed-mean predictions on the training points, RMS distance to the limit with both sides' "
            figure.note += (
                "sampling noise removed: "
                + ", ".join(
                    f"N = {n}: {v[1]:.2e} (noise {v[2]:.1e})"
                    if np.isfinite(v[1])
                    else f"N = {n}: within noise {v[2]:.1e}"
                    for n, v in sorted(predictions.items())
                )
                + "."
            )
            if len(resolved) >= 3:
                n, v = zip(*sorted(resolved.items()))
                figure.note += f" Fitted slope {float(np.polyfit(np.log(n), np.log(v), 1)[0]):.2f} (theory −1)."
        below = [n for n, d in zip(sizes, deviations) if d <= error]
        if below:
            figure.caveats.append(
                f"at N = {', '.join(map(str, below))} the distance is within the limit's own Monte Carlo error: the "
                "slope there measures that error, not the width — more samples/replicas for the limit"
            )
        if len(sizes) < 4:
            figure.caveats.append(f"{len(sizes)} widths: a slope over so few is not a measurement of the scaling law")
        seeds = min(len(same) for same in widths.values())
        if seeds < 8:
            figure.caveats.append(
                f"{seeds} seed(s) per width: the seed mean's own spread (∝ 1/√(seeds·N)) can hide the 1/N bias"
            )
    else:
        distance_ax.set_visible(False)
        figure.caveats.append("one width: no distance against width")
    if not settings.get("converged", True):
        figure.caveats.append("the limit's DMFT iteration did not converge: it is not the limit")
    return fig


@register_figure(
    order=15,
    key="limit_posterior",
    title="Posterior-mean feature kernels against the posterior's saddle point",
    header=[
        "width",
        "seeds",
        "layer",
        "|Φ_N − Φ*| / |Φ*|",
        "NNGP's",
        "cosine to Φ*",
        "TV to the tilted density",
        "effective samples",
    ],
)
def limit_posterior(runs: Sequence[Run], figure: Figure):
    """A Langevin sweep against its limit (``lightning-mup limit`` on a Langevin recipe): each hidden layer's
    posterior-mean kernel (PosteriorMoments at its last saved step, the seed mean) against the saddle's, as the
    relative distance against width with its fitted slope (the saddle-point argument: N^-1), beside the NNGP's
    distance (what γ0 → 0 would give) and the saddle's own Monte Carlo error; and each layer's posterior-mean
    preactivation histogram against the saddle's tilted single-site density (total-variation distance per width)."""
    limit, settings, matching = _limit_and_runs(runs, figure, kind="statics")
    saddle, nngp = limit["feature_kernels_train_final"], limit["nngp_kernels_train"]
    error = np.array([np.linalg.norm(e) / np.linalg.norm(k) for k, e in zip(saddle, limit["feature_kernels_error"])])
    layers, measured, untrusted = len(saddle), {}, 0
    outputs: dict[int, list[np.ndarray]] = {}  # width -> each seed's posterior-mean outputs on the training points
    gibbs: dict[int, list[float]] = {}  # width -> each seed's validation loss averaged over the chain after burn-in
    for run in matching:
        files = run.step_files("posterior")
        arrays = run.arrays("posterior", max(files)) if files else None
        if arrays is None or probe_of(arrays) != settings["probe_fingerprint"]:
            continue
        keys = [k for k in arrays if k.startswith("phi_mean/")]
        if len(keys) != layers or any(arrays[k].shape != saddle[0].shape for k in keys):
            figure.caveats.append(f"{run.folder.name}: its posterior kernels are not the saddle's {layers} layers")
            continue
        ess = min(float(v) for k, v in arrays.items() if k.startswith("ess/"))
        minimum = (run.callback_settings("PosteriorMoments") or {}).get("min_ess", 100)
        untrusted += ess < float(minimum)
        histograms = [k for k in arrays if k.startswith("hist/")]  # saved in the layers' order
        densities = [arrays[k] for k in histograms] if len(histograms) == layers else None
        measured.setdefault(run.width, []).append(([arrays[k] for k in keys], ess, densities, arrays.get("edges")))
        outputs.setdefault(run.width, []).append(np.asarray(arrays.get("outputs_mean", np.nan)).reshape(-1))
        series, burn_in = run.series("val_loss"), (run.callback_settings("PosteriorMoments") or {}).get("burn_in", 0)
        if series is not None and np.any(series[0] >= burn_in):
            gibbs.setdefault(run.width, []).append(float(np.nanmean(series[1][series[0] >= burn_in])))
    if not measured:
        raise Skip(
            "no run saved PosteriorMoments' kernels on the limit's training points — add PosteriorMoments to the "
            "Langevin recipe (its default probe is the full training batch)"
        )
    if untrusted:
        figure.caveats.append(
            f"{untrusted} run(s) have fewer effective samples than their min_ess: their averages are not converged"
        )
    nngp_distance = [float(np.linalg.norm(n - k) / np.linalg.norm(k)) for n, k in zip(nngp, saddle)]
    widths = sorted(measured)
    distances = np.zeros((len(widths), layers))
    samples = limit.get("preactivations_train_final")
    tilted: dict[int, list[np.ndarray]] = {}  # width -> the seed-mean posterior densities per layer
    for width in widths:
        members = [m for m in measured[width] if m[2] is not None and m[3] is not None]
        if members and samples is not None:
            tilted[width] = [np.mean([m[2][layer] for m in members], axis=0) for layer in range(layers)]
            edges = members[0][3]
    nan = float("nan")
    for row, width in enumerate(widths):
        members = measured[width]
        means = [np.mean([m[0][layer] for m in members], axis=0) for layer in range(layers)]
        for layer in range(layers):
            target = saddle[layer]
            distances[row, layer] = np.linalg.norm(means[layer] - target) / np.linalg.norm(target)
            cosine = float(np.sum(means[layer] * target) / (np.linalg.norm(means[layer]) * np.linalg.norm(target)))
            tv = nan
            if width in tilted:
                reference = histogram(samples[layer], edges)
                tv = float(0.5 * np.sum(np.abs(tilted[width][layer] - reference) * np.diff(edges)))
            figure.rows.append(
                [
                    width,
                    len(members),
                    layer + 1,
                    float(distances[row, layer]),
                    nngp_distance[layer],
                    cosine,
                    tv,
                    min(m[1] for m in members),
                ]
            )
    plt = pyplot()
    fig, all_axes = plt.subplots(1, 1 + (layers if tilted else 0), figsize=(5.6 + (4.2 * layers if tilted else 0), 4))
    ax = all_axes[0] if tilted else all_axes
    if tilted:
        centres = 0.5 * (edges[1:] + edges[:-1])
        for layer, hist_ax in enumerate(all_axes[1:]):
            for width, color in zip(tilted, colors(len(tilted))):
                hist_ax.plot(centres, tilted[width][layer], color=color, lw=1, label=f"N={width}")
            hist_ax.plot(centres, histogram(samples[layer], edges), "k--", lw=1.5, label="saddle (tilted density)")
            hist_ax.set(xlabel="preactivation h", ylabel="density", title=f"layer {layer + 1}")
            hist_ax.legend(fontsize=7, frameon=False)
    slopes = []
    for layer, color in zip(range(layers), colors(layers)):
        ax.loglog(widths, distances[:, layer], "o-", color=color, label=f"layer {layer + 1}")
        ax.axhline(nngp_distance[layer], color=color, ls="--", lw=1)
        if len(widths) >= 2:
            slopes.append(float(np.polyfit(np.log(widths), np.log(distances[:, layer]), 1)[0]))
    ax.axhline(error.max(), color="grey", ls=":", label=f"the saddle's MC error ({error.max():.1e})")
    ax.set(xlabel="width N", ylabel="|Φ_N − Φ*| / |Φ*|", title="posterior mean vs saddle (dashed: NNGP)")
    ax.legend(fontsize=7, frameon=False)
    width_axis(ax, widths)
    figure.note = (
        f"The saddle of {settings['config']} ({settings['depth']} hidden layers, {settings['activation']}, γ0 = "
        f"{settings['gamma0']:g}, β = {settings['beta']:g}) against each width's seed-mean posterior kernels. "
        + (
            f"Fitted slopes per layer: {', '.join(f'{s:.2f}' for s in slopes)} (saddle-point argument: −1). "
            if slopes
            else ""
        )
        + f"Validation loss: adaptive predictor {float(limit['adaptive_test_loss']):.4g}, NNGP "
        f"{float(limit['nngp_test_loss']):.4g}."
    )
    if "adaptive_train_mean" in limit:
        target = limit["adaptive_train_mean"]
        parts = []
        for width in widths:
            mean = np.mean(outputs.get(width, [np.full_like(target, np.nan)]), axis=0)
            rms = (
                float(np.sqrt(np.mean((mean - target) ** 2)) / np.sqrt(np.mean(target**2)))
                if mean.shape == target.shape
                else nan
            )
            loss = np.mean(gibbs[width]) if width in gibbs else nan
            parts.append(f"N = {width}: predictions {rms:.3f}, validation loss {loss:.4g}")
        figure.note += (
            " Posterior-mean predictions on the training points against the saddle's (relative RMS) and the networks'"
            " validation loss averaged over the chain after the burn-in: " + "; ".join(parts) + "."
        )
    if not settings.get("converged", True):
        figure.caveats.append("the saddle did not converge: " + "; ".join(settings.get("notes", [])))
    elif settings.get("notes"):  # settled, with what its numbers do not include (a finite-particle bias)
        figure.caveats.append("the saddle: " + "; ".join(settings["notes"]))
    return fig
