"""Langevin training (unadjusted Langevin / SGLD): the optimizer whose chain samples a network's Bayesian posterior.

Per step, for each parameter θ of a group with learning rate η and μP learning-rate scale s (1 without μP):

    θ ← θ − η s ∇loss − (η / (β σ²)) θ + √(2η/β) ξ,        ξ ~ N(0, I),

whose stationary law (as η → 0) is p(θ) ∝ exp(−β s · loss(θ) − |θ|²/(2σ²)): a Gaussian prior of standard deviation
σ per tensor (``prior_std``; ``"init"``: each tensor's own initial RMS, i.e. its init distribution) and the
likelihood at inverse temperature β sharpened by s. Under ``MuPStrategy(parametrization="mf")`` every role's SGD
scale is s = γ0² N, so the chain samples the μP posterior of ``../shared/papers/STATICS.md``,
exp(−β N γ0² · loss − |θ|²/(2σ²)), with the same η at every width: the data term moves the network as μP's SGD
does, and the prior's pull and the noise act on the O(1) stored weights. For that convention ``loss`` is
½ Σ_μ (f_μ − y_μ)² summed over the training points (a minibatch's sum × P/B estimates it).

The noise comes from a seed of the optimizer's own (``seed``, or one drawn once from torch's generator and, under
torch.distributed, rank 0's sent to every rank) and the step count, both kept in the optimizer's state: every DDP
replica draws the same noise, as it must for the replicas to stay one network, and a resumed chain goes on with
fresh noise rather than replaying it.

A posterior needs one temperature for all parameters: groups whose μP scales differ (``mup``, ``ntk``: roles scaled
differently) would each sample at their own — refused by :meth:`Langevin.check_scales`, which MuPStrategy calls
before training. The unadjusted step biases the stationary law by O(η): shrink η until the measured posterior
stops moving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch.optim import Optimizer

from lightning_mup.parametrize.optim import declare_optimizer_family, group_scales


class Langevin(Optimizer):
    """Langevin dynamics with a Gaussian prior (see the module docstring).

    Args:
        params: parameters or groups (a group may set its own ``prior_std``).
        lr: η, the step on the data term before μP's scale (and the step of the prior and noise).
        beta: inverse temperature β.
        prior_std: σ, the prior's standard deviation: a float, or ``"init"`` for each tensor's initial RMS
            (read at the first step and kept in the state).
        seed: the noise's seed (default: drawn at the first step; the same on every distributed rank).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        beta: float,
        prior_std: float | str = "init",
        seed: int | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"Langevin lr={lr}: the step must be positive")
        if not beta > 0:
            raise ValueError(f"Langevin beta={beta}: the inverse temperature must be positive")
        _check_prior(prior_std)
        super().__init__(params, {"lr": lr, "beta": beta, "prior_std": prior_std})
        self.seed = seed
        self._checked = False
        self._generators: dict[torch.device, torch.Generator] = {}

    def add_param_group(self, param_group: dict) -> None:
        _check_prior(param_group.get("prior_std", self.defaults.get("prior_std")))
        super().add_param_group(param_group)

    def check_scales(self, names: Mapping[int, str] | None = None) -> None:
        """Refuse groups that cannot sample one posterior: μP learning-rate scales that differ between groups
        (each would sample at its own temperature), and ``prior_std="init"`` on a tensor that starts constant
        (a zero bias, a norm's unit gain: its init distribution is no Gaussian to read)."""
        names = names or {}
        scales = {round(float(group_scales(g)["lr"]), 9) for g in self.param_groups}
        if len(scales) > 1:
            roles = {
                ", ".join(g.get("mup_roles", [])) or f"group {i}": group_scales(g)["lr"]
                for i, g in enumerate(self.param_groups)
            }
            raise ValueError(
                f"Langevin: the parameter groups have different μP learning-rate scales {roles}, so each would "
                "sample at its own temperature and the chain has no posterior. One scale for every parameter needs "
                "parametrization='mf' (mup and ntk scale roles differently) on a network whose scaled tensors all "
                "have one width: mf's SGD scale is γ0²·n with n each tensor's own width (a transformer's wider MLP "
                "has its own), and fixed-size tensors are not scaled — such a model has no single μP posterior "
                "for Langevin to sample"
            )
        constant = []
        for group in self.param_groups:
            if group["prior_std"] != "init":
                continue
            for p in group["params"]:
                if p.numel() < 2 or float(p.detach().float().std()) == 0.0:
                    constant.append(names.get(id(p), f"a tensor of shape {tuple(p.shape)}"))
        if constant:
            raise ValueError(
                f"Langevin(prior_std='init'): {constant} start constant (or have one entry), so their init "
                "distribution gives no prior. Put them in a parameter group with a prior_std of their own, e.g. "
                "[{'params': other}, {'params': those, 'prior_std': 1.0}], or leave them out of the optimizer"
            )

    def _noise_seed(self) -> int:
        """This chain's seed: given, or drawn once — on rank 0, then sent to every rank."""
        for group in self.param_groups:  # (restored with the optimizer's state on resume)
            if "noise_seed" in group:
                return group["noise_seed"]
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        if self.seed is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            device = self.param_groups[0]["params"][0].device if torch.distributed.get_backend() == "nccl" else "cpu"
            shared = torch.tensor([seed], dtype=torch.int64, device=device)
            torch.distributed.broadcast(shared, src=0)
            seed = int(shared.item())
        for group in self.param_groups:
            group["noise_seed"], group["noise_steps"] = seed, 0
        return seed

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._checked:  # without MuPStrategy (which checks before training), at the first step
            self.check_scales()
            self._checked = True
        seed = self._noise_seed()
        for index, group in enumerate(self.param_groups):
            # this step's noise: a function of (seed, group, step), the same on every rank and after a resume
            group["noise_steps"] = group.get("noise_steps", 0) + 1
            draw = (seed + 1_000_003 * group["noise_steps"] + index) % 2**63
            scale = float(group_scales(group)["lr"])
            lr = group["lr"] / scale  # the step hook multiplied it by the μP scale: η itself for prior and noise
            beta = group["beta"]
            generators: dict[torch.device, torch.Generator] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "prior_std" not in state:
                    std = group["prior_std"]
                    state["prior_std"] = float(p.detach().float().pow(2).mean().sqrt()) if std == "init" else std
                prior_var = state["prior_std"] ** 2
                if not prior_var > 0:
                    raise ValueError(
                        f"Langevin: a tensor of shape {tuple(p.shape)} has prior_std 0 (prior_std='init' on a tensor "
                        "that starts at zero); give it a prior_std of its own"
                    )
                if p.device not in generators:
                    generators[p.device] = self._generator(p.device, draw)
                noise = torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)
                p.mul_(1.0 - lr / (beta * prior_var))  # (Euler–Maruyama: every term at the current θ)
                p.add_(p.grad, alpha=-lr * scale)
                p.add_(noise, alpha=math.sqrt(2.0 * lr / beta))
        return loss


def _check_prior(prior_std) -> None:
    if prior_std == "init":
        return
    if not isinstance(prior_std, (int, float)) or not prior_std > 0:
        raise ValueError(f"Langevin prior_std={prior_std!r}: a positive standard deviation, or 'init'")


declare_optimizer_family(Langevin, "sgd")
