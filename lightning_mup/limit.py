"""``lightning-mup limit``: the infinite-width limit of a recipe, where the recipe is in the solver's scope.

Reads the recipe as ``fit`` would (nothing is trained), checks that it is what :func:`~lightning_mup.theory.solve_dmft`
describes — a bias-free MLP with N(0, 1/fan_in) weights in the ``mf`` parametrization, plain SGD, full-batch
gradient descent on a fixed training set with the mean squared error — and says which setting is not where it
is not. Then solves the DMFT on the recipe's own training and validation points and writes ``limit.npz``; put
it in a sweep folder and ``lightning-mup report`` draws every width against it.

A Langevin recipe (the same MLP, sampled by :class:`~lightning_mup.Langevin` with the N(0, 1) prior on a fixed full
batch) has the posterior's saddle point as its limit instead: its kernels on the training points (the
nonlinear particle solver, or the exact one for a linear network) and the adaptive predictor's and the NNGP's
validation loss, written with ``kind: statics``; the report draws PosteriorMoments' posterior-mean kernels of every
width against them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_mup._help import HelpFormatter
from lightning_mup._run_folder import LIMIT_FILE, recipe_fingerprint


class OutOfScope(ValueError):
    """The recipe is not one the infinite-width solver describes."""


def limit_inputs(config: Path, overrides: list[str]) -> dict[str, Any]:
    """The solver's arguments read from a recipe, or :class:`OutOfScope` naming every setting that is not."""
    from lightning_mup._run_folder import fingerprint
    from lightning_mup.data.gegenbauer import GegenbauerDataModule
    from lightning_mup.models.regression import MLPRegressor
    from lightning_mup.parametrize.langevin import Langevin
    from lightning_mup.parametrize.settings import MuPSettings
    from lightning_mup.recipe import lightning_cli
    from lightning_mup.strategy import MuPStrategy

    # the solve that follows keeps this process's threads (lightning_cli's default is one, for runs)
    cli = lightning_cli(
        [f"--config={config}", "--trainer.logger=false", *overrides], threads=torch.get_num_threads(), run=False
    )
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    problems = []
    strategy = trainer.strategy
    settings = strategy.settings if isinstance(strategy, MuPStrategy) else None
    kwargs = settings.options() if settings is not None else {}
    if kwargs.get("parametrization") != "mf":
        problems.append(
            f"parametrization={kwargs.get('parametrization')!r}: the limit is computed in the mean-field form — "
            "trainer.strategy.init_args.parametrization=mf (richness: gamma0)"
        )
    if kwargs.get("readout_zero_init"):
        problems.append("readout_zero_init=true: the theory's readout starts from w(0) ~ N(0, 1)")
    if kwargs.get("output_mult", 1.0) != 1.0 or kwargs.get("lr_mults"):
        problems.append("output_mult / lr_mults: the solver has the mf form's own multipliers and learning rates only")
    ruled = [name for name in MuPSettings.AXIS_FIELDS if kwargs.get(name) is not None]
    if ruled:
        problems.append(f"{', '.join(ruled)}: the solver trains at the recipe's lr and decay, without axis rules")
    hp = getattr(model, "hparams", {})
    if not isinstance(model, MLPRegressor) or hp.get("residual"):
        problems.append(f"model {type(model).__name__}: the solver covers MLPRegressor's plain MLP (residual=false)")
    else:
        if hp.get("bias", True):
            problems.append("bias=true: the solver's MLPs are bias-free (model.init_args.bias=false)")
        if hp.get("init") != "normal":
            problems.append("init: the theory's weights are N(0, 1/fan_in) (model.init_args.init=normal)")
        if hp.get("out_dim", 1) != 1:
            problems.append(f"out_dim={hp.get('out_dim')}: one output")
    optimizer = model.optimizer([torch.nn.Parameter(torch.zeros(1))])
    defaults = optimizer.defaults
    statics = isinstance(optimizer, Langevin)
    if statics:
        if defaults.get("prior_std") not in (1.0, "init"):
            problems.append(
                f"prior_std={defaults.get('prior_std')!r}: the saddle's prior is the mf form's N(0, 1) weights "
                "(prior_std: 1.0)"
            )
    elif type(optimizer) is not torch.optim.SGD:
        problems.append(f"optimizer {type(optimizer).__name__}: the solver's dynamics are plain gradient descent (SGD)")
    elif defaults.get("momentum") or defaults.get("weight_decay") or defaults.get("nesterov"):
        problems.append("SGD with momentum or weight decay: the solver's dynamics are plain gradient descent")
    if getattr(model, "lr_scheduler", None) is not None:
        problems.append("an lr_scheduler: the solver's learning rate is constant")
    if not isinstance(data, GegenbauerDataModule) or data.hparams.train_size is None:
        problems.append(
            "data: the limit is of full-batch gradient descent on a fixed training set — GegenbauerDataModule with "
            "data.init_args.train_size=P (an online stream has no such limit here)"
        )
    steps = trainer.max_steps
    if statics:
        pass  # a chain's length decides how well it samples, not what it samples
    elif steps is None or steps < 1:
        problems.append("trainer.max_steps: the number of gradient-descent steps")
    if trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
        problems.append("gradient accumulation or clipping: not plain gradient descent")
    if problems:
        raise OutOfScope(f"{config} is outside the infinite-width solver's scope: " + "; ".join(problems))
    x_train, y_train = data.training_set()
    x_test, y_test = data.validation_set()
    if statics:
        # the recipe's loss is the mean over P: β·γ0²N·MSE = (2β/P)·γ0²N·½Σ(f − y)², STATICS.md's β is 2β/P
        return dict(
            kind="statics",
            x_train=x_train.double().numpy(),
            y_train=y_train.double().numpy().reshape(-1),
            x_test=x_test.double().numpy(),
            y_test=y_test.double().numpy().reshape(-1),
            depth=hp["depth"] - 1,  # hidden layers
            activation=_activation(hp["activation"]),
            gamma0=float(kwargs.get("gamma0") or 1.0),
            beta=2.0 * float(defaults["beta"]) / len(x_train),
            fingerprint=recipe_fingerprint(cli.config.as_dict(), MuPSettings.LIMIT_FIELDS),
            probe=fingerprint([x_train, y_train]),
        )
    return dict(
        x_train=x_train.double().numpy(),
        y_train=y_train.double().numpy().reshape(-1),
        x_test=x_test.double().numpy(),
        y_test=y_test.double().numpy().reshape(-1),
        depth=hp["depth"],
        activation=_activation(hp["activation"]),
        gamma0=float(kwargs.get("gamma0") or 1.0),
        lr=float(defaults["lr"]),
        steps=int(steps),
        fingerprint=recipe_fingerprint(cli.config.as_dict(), MuPSettings.LIMIT_FIELDS),
        probe=fingerprint([x_train, y_train]),  # the full batch as the loader gives it: the callbacks' probe
    )


def _activation(name: str) -> str:
    """The model's activation as the solver names it (one registry: :mod:`lightning_mup.theory.activations`)."""
    from lightning_mup.theory.activations import ACTIVATIONS

    if name not in ACTIVATIONS:
        raise OutOfScope(f"activation={name!r}")
    return name


def compute_limit(
    config: Path,
    out: Path,
    samples: int,
    replicas: int,
    overrides: list[str],
    response_samples: int | None = None,
    saddle_steps: int = 1000,
) -> Path:
    from lightning_mup.theory import solve_dmft

    inputs = limit_inputs(config, overrides)
    if inputs.get("kind") == "statics":
        return _compute_saddle(config, out, inputs, particles=samples, replicas=replicas, steps=saddle_steps)
    y_test, recipe, probe = inputs.pop("y_test"), inputs.pop("fingerprint"), inputs.pop("probe")
    name = inputs["activation"] if isinstance(inputs["activation"], str) else "gelu"
    print(
        f"limit of {config}: depth {inputs['depth']}, {name}, γ0 = {inputs['gamma0']:g}, η0 = {inputs['lr']:g}, "
        f"{inputs['steps']} steps, {len(inputs['x_train'])} training + {len(inputs['x_test'])} validation points; "
        f"{replicas} replicas × {samples} samples",
        flush=True,
    )
    solution = solve_dmft(
        **inputs, samples=samples, replicas=replicas, response_samples=response_samples, progress=True
    )
    print(solution.summary())
    p_train = len(inputs["x_train"])
    test = solution.outputs[:, p_train:]
    settings = {
        **solution.settings,
        "config": str(config),
        "converged": solution.converged,
        "fingerprint": recipe,
        "probe_fingerprint": probe,
    }
    settings["activation"] = settings["activation"] if isinstance(settings["activation"], str) else "gelu"
    rng = np.random.default_rng(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        outputs=solution.outputs,
        outputs_error=solution.outputs_error,
        loss=solution.loss,
        loss_error=solution.loss_error,
        test_loss=((test - y_test) ** 2).mean(axis=1),
        y_train=inputs["y_train"],
        y_test=y_test,
        feature_kernels_final=np.stack([k[-1, :, -1, :] for k in solution.feature_kernels]),
        # on the training points alone: what the recipe's callbacks measure (their probe is the full batch)
        feature_kernels_train_final=np.stack([k[-1, :p_train, -1, :p_train] for k in solution.feature_kernels]),
        preactivations_train_final=np.stack(
            [
                rng.choice(h[:, -1, :p_train].reshape(-1), size=min(20000, h[:, -1, :p_train].size), replace=False)
                for h in solution.preactivations
            ]
        ),
        preactivations_final=np.stack(
            [
                rng.choice(h[:, -1].reshape(-1), size=min(20000, h[:, -1].size), replace=False)
                for h in solution.preactivations
            ]
        ),
        settings=json.dumps(settings),
    )
    print(f"wrote {out}{'' if solution.converged else ' — NOT CONVERGED: not the limit'}")
    return out


def _compute_saddle(config: Path, out: Path, inputs: dict[str, Any], particles: int, replicas: int, steps: int) -> Path:
    """A Langevin recipe's limit: the posterior's saddle (:func:`~lightning_mup.theory.nonlinear_saddle`; the
    exact solver for a linear network), its adaptive predictor and the NNGP's on the validation points."""
    from lightning_mup.theory import deep_linear_saddle, kernel_regression, nngp_posterior, nonlinear_saddle

    x, y, x_test, y_test = inputs["x_train"], inputs["y_train"], inputs["x_test"], inputs["y_test"]
    depth, activation, gamma0, beta = inputs["depth"], inputs["activation"], inputs["gamma0"], inputs["beta"]
    print(
        f"posterior saddle of {config}: {depth} hidden layers, {activation}, γ0 = {gamma0:g}, β = {beta:g} "
        f"(the recipe's β·2/P), {len(x)} training + {len(x_test)} validation points",
        flush=True,
    )
    if activation == "identity":
        saddle = deep_linear_saddle(x, y, depth, gamma0, beta)
        errors = [np.zeros_like(k) for k in saddle.kernels]
        converged, notes = saddle.converged, saddle.notes
    else:
        replicas = max(2, replicas)
        saddle = nonlinear_saddle(
            x, y, depth, gamma0, beta, activation, particles=particles, replicas=replicas, steps=steps, progress=True
        )
        errors, converged, notes = saddle.kernel_errors, saddle.converged, saddle.notes
    adaptive = saddle.predict(x, x_test).mean.reshape(-1)
    nngp = nngp_posterior(x, y, x_test, depth, beta, activation).mean.reshape(-1)
    settings = {
        "kind": "statics",
        "config": str(config),
        "depth": depth,
        "activation": activation,
        "gamma0": gamma0,
        "beta": beta,
        "converged": bool(converged),
        "notes": notes,
        "fingerprint": inputs["fingerprint"],
        "probe_fingerprint": inputs["probe"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        feature_kernels_train_final=np.stack(saddle.kernels),
        feature_kernels_error=np.stack(errors),
        preactivations_train_final=np.stack(saddle.preactivation_samples()),
        nngp_kernels_train=np.stack([_nngp_kernel(x, layer, activation) for layer in range(1, depth + 1)]),
        adaptive_test_loss=np.mean((adaptive - y_test) ** 2),
        # the posterior mean on the training points: Φ^L(Φ^L + β⁻¹I)⁻¹y, what PosteriorMoments' outputs_mean approaches
        adaptive_train_mean=kernel_regression(*(3 * [saddle.kernels[-1]]), y, beta).mean.reshape(-1),
        nngp_test_loss=np.mean((nngp - y_test) ** 2),
        y_train=y,
        y_test=y_test,
        settings=json.dumps(settings),
    )
    print(
        f"yᵀΦ^ℓy/|y|² = {np.round(saddle.task_alignment(), 4)}; validation loss: adaptive "
        f"{np.mean((adaptive - y_test) ** 2):.4g}, NNGP {np.mean((nngp - y_test) ** 2):.4g}"
    )
    said = "" if converged else " — NOT CONVERGED"
    print(f"wrote {out}{said}" + "".join(f"\n  note: {note}" for note in notes))
    return out


def _nngp_kernel(x: np.ndarray, layer: int, activation: str) -> np.ndarray:
    from lightning_mup.theory.lazy import mlp_kernels

    return mlp_kernels(x, layer + 1, activation).nngp


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-mup limit",
        description="the infinite-width limit of a recipe in the solvers' scope, written to limit.npz: the DMFT of "
        "gradient descent, or for a Langevin recipe the posterior's saddle point",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="the recipe (e.g. recipes/gegenbauer_limit.yaml)")
    parser.add_argument("--out", type=Path, default=Path(LIMIT_FILE), help="where limit.npz goes (a sweep folder)")
    parser.add_argument(
        "--samples", type=int, default=2000, help="single-site samples per replica (a Langevin recipe: particles)"
    )
    parser.add_argument("--replicas", type=int, default=2, help="independent replicas (error bars)")
    parser.add_argument(
        "--response-samples",
        type=int,
        default=None,
        help="samples carrying the exact sensitivities behind the response functions (default: all; fewer for "
        "large P·T — their sampling error is in the error bars)",
    )
    parser.add_argument(
        "--saddle-steps", type=int, default=1000, help="a Langevin recipe: the particle solver's steps (half averaged)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    args = parser.parse_args(argv)
    if not args.config.exists():
        raise FileNotFoundError(f"--config {args.config} does not exist")
    out = args.out / LIMIT_FILE if args.out.is_dir() else args.out
    compute_limit(
        args.config,
        out,
        args.samples,
        args.replicas,
        [f"--{s}" for s in args.set],
        args.response_samples,
        saddle_steps=args.saddle_steps,
    )
