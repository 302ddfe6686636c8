"""The zoo (tests/zoo.py): every architecture lightning_mup claims, in μP for real — or refused with the
module and the fix. Widths 16 → 64 (4×), base 16, 4 Adam steps at lr 3e-3 and at 1e-2 (the same for every
model), two seeds.

For each model: parametrize leaves every buffer, mode, flag and the RNG bit-identical; every parameter has a
role and tied tensors are counted once; after the steps, the coordinate size of every residual block's output,
what training added to the logits and to each router's logits change with width by m^±0.2 at most under μP,
while what one step adds to the unmodified model's logits grows (slope > 0.3); the attention logits at
initialisation follow 1/head_dim (head_dim grows 4× with the width: slope −½). A readout tied to the embedding is
either flat as it is or named by the self-check before training, and flat untied (``tied_readout="untie"``)."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from zoo import ZOO, batch_for, loss_for

from lightning_mup import parametrize, scale_optimizer
from lightning_mup._untouched import as_in_training
from lightning_mup.families.blocks import find_blocks
from lightning_mup.parametrize.probe import probe

BASE, WIDE = 16, 64
STEPS, LRS, SEEDS = 4, (3e-3, 1e-2), (0, 1, 2, 3)
BAR, GROWTH = 0.2, 0.3
# A router's change is noisier than a block's (one MoE layer, 4 experts): 8 seeds (Mixtral, lr 1e-2: slope +0.27
# with 4 seeds, +0.15 with 8 at widths 16 → 64 and −0.08 at 64 → 256)
ROUTER_SEEDS = tuple(range(8))


def _falcon_scale_is_reachable() -> bool:
    """transformers ≥ 5.25 passes FalconAttention's ``scaling`` to every attention backend (patched and verified);
    before, the scale was computed inline (refused with the fix). The zoo follows the installed version."""
    from transformers.models.falcon import modeling_falcon

    return "self.scaling" in inspect.getsource(modeling_falcon.FalconAttention.__init__)


# Architectures whose attention scale cannot be reached when head_dim grows: refused, with the true reason.
REFUSED = {
    "hf_modernbert": r"attn \(ModernBertAttention\) changes head_dim 8→32 .*grow the number of heads",
    # (built with growing heads in the zoo; with two heads, head_dim grows: F.multi_head_attention_forward's scale)
    "torch_transformer_head_dim": r"self_attn \(MultiheadAttention\) changes head_dim 8→32 .*in no attribute",
}
if not _falcon_scale_is_reachable():
    REFUSED["hf_falcon"] = r"self_attention \(FalconAttention\) changes head_dim 8→32 .*grow the number of heads"


def _sizes(model, arch, batch, parametrized: bool, steps: int, lr: float, routers=(), watch_logits=True):
    """Train for ``steps`` Adam steps. Returns mean |h| of the block outputs at the end, and what training added
    to the logits and to each router's logits — and the attention logits' RMS at initialisation. (What training
    adds to the attention logits is O(1) in μP only once q·k's own updates dominate their cross terms with the
    random initial q and k, which shrink as d_head^-½: a few steps in, at widths 16 and 64, it is too noisy to
    assert — the 1/d_head rule itself is asserted at initialisation.)"""
    loss_fn = loss_for(arch)
    record = getattr(model, "_record", None)  # (a readout is the logits' business, checked as Δlogits)
    readouts = {n.rsplit(".", 1)[0] for n, p in record.params.items() if p.role == "output"} if record else set()
    blocks = find_blocks(model).names or [n for n, _ in model.named_children() if n not in readouts]
    modules = dict(model.named_modules())
    call = lambda net: _logits(net, arch, batch)  # noqa: E731
    # measured as training computes (BatchNorm on batch statistics, dropout off), as the self-check measures
    caught = {}
    watched = [*blocks, *routers]
    handles = [
        modules[b].register_forward_hook(lambda m, a, out, b=b: caught.__setitem__(b, _first(out))) for b in watched
    ]
    with torch.no_grad(), as_in_training(model):
        before = probe(model, lambda: call(model)) if watch_logits else None
        logits0 = _logits(model, arch, batch)
    routers0 = {r: caught[r].clone() for r in routers if caught.get(r) is not None}
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if parametrized:
        scale_optimizer(optimizer, model._record, model)
    first_step = None
    for step in range(steps):
        model.train()
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        if step == 0:
            with torch.no_grad(), as_in_training(model):
                first_step = float((_logits(model, arch, batch) - logits0).abs().mean())
    caught.clear()
    with torch.no_grad(), as_in_training(model):
        logits = _logits(model, arch, batch)
    for h in handles:
        h.remove()
    sizes = {f"block {b}": float(caught[b].abs().mean()) for b in blocks if caught.get(b) is not None}
    sizes.update({f"Δrouter {r}": float((caught[r] - value).abs().mean()) for r, value in routers0.items()})
    sizes["Δlogits"] = float((logits - logits0).abs().mean())
    sizes["Δlogits after one step"] = first_step
    return sizes, {k: (v, before.head_dims.get(k)) for k, v in before.logits.items()} if before else {}


def _first(out):
    if isinstance(out, torch.Tensor):
        return out.detach().float()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].detach().float()
    return getattr(out, "last_hidden_state", None)


def _logits(model, arch, batch):
    if arch.kind == "image":
        out = model(batch[0])
    elif arch.kind == "seq2seq":
        out = model(input_ids=batch, decoder_input_ids=batch)
    elif arch.kind == "text_encoder":
        return model(input_ids=batch).text_embeds
    elif arch.kind == "plain_lm":
        return model(batch)
    else:
        out = model(input_ids=batch)
    return out.logits if hasattr(out, "logits") else out


def _routers(record) -> list[str]:
    """Modules holding an output-role tensor other than the last readout: MoE routers, gates."""
    holders = [n.rsplit(".", 1)[0] for n, p in record.params.items() if p.role == "output"]
    return sorted({h for h in holders if any(w in h.rsplit(".", 1)[-1] for w in ("gate", "router"))})


def _run(
    name: str, parametrized: bool, lr: float, seeds=SEEDS, steps=STEPS, tied_readout="keep", routers=(), init=True
):
    arch = ZOO[name]
    base, wide = arch.widths or (BASE, WIDE)
    per_width, initial, head_dims = {}, {}, {}
    for width in (base, wide):
        totals: dict[str, list[float]] = {}
        checked = None  # the self-check's corrections at this width, measured on the first seed
        for seed in seeds:
            torch.manual_seed(seed)
            model = arch.build(width)
            if parametrized:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the self-check's notes are asserted elsewhere
                    model._record = parametrize(
                        model,
                        base=lambda: arch.build(base),
                        delta=(lambda: arch.build(wide)) if width == base else None,
                        tied_readout=tied_readout,
                        check=checked is None,
                        check_optimizer=None,  # (the training self-check is asserted on once, in the test)
                    )
                if checked is None:
                    checked = list(model._record.hooks)
                else:  # (the same structure at every seed: the corrections measured once apply to all)
                    model._record.hooks = list(checked)
                    model._record.attach(model)
            batch = batch_for(arch, torch.Generator().manual_seed(seed))
            sizes, logits0 = _sizes(model, arch, batch, parametrized, steps, lr, routers, watch_logits=init)
            for key, value in sizes.items():
                totals.setdefault(key, []).append(value)
            for key, (value, head_dim) in logits0.items():
                initial.setdefault((width, key), []).append(value)
                head_dims[(width, key)] = head_dim
        per_width[width] = {k: float(np.mean(v)) for k, v in totals.items()}
    keys = {k for k in set(per_width[base]) & set(per_width[wide]) if per_width[base][k] > 0 and per_width[wide][k] > 0}
    slopes = {k: math.log(per_width[wide][k] / per_width[base][k]) / math.log(wide / base) for k in keys}
    # (slope, what μP's 1/d_head predicts: −½ per doubling… of the measured head_dim, 0 where heads grow instead or the
    # logits contract over tokens)
    init_slopes = {
        k: (
            math.log(np.mean(initial[(wide, k)]) / np.mean(initial[(base, k)])) / math.log(wide / base),
            -0.5 * math.log((head_dims[(wide, k)] or 1) / (head_dims[(base, k)] or 1)) / math.log(wide / base),
        )
        for (w, k) in initial
        if w == wide and (base, k) in initial
    }
    return slopes, init_slopes


def _off(slopes) -> dict[str, float]:
    return {k: round(s, 3) for k, s in slopes.items() if k != "Δlogits after one step" and abs(s) > BAR}


def _untouchable_state(model):
    """What parametrize may not change: buffers (bytes), modes, requires_grad flags, the RNG stream."""
    buffers = {n: (b.dtype, tuple(b.shape), b.detach().cpu().numpy().tobytes()) for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return buffers, modes, flags, torch.get_rng_state().numpy().tobytes()


def _tied_readouts(record) -> list[str]:
    readouts = {h.module for h in record.hooks if h.reason == "readout multiplier"}
    return [a for p in record.params.values() if p.role == "input" for a in p.tied if a.rsplit(".", 1)[0] in readouts]


# Known failures, kept visible: the test fails loudly the day they are fixed.
_NOT_CLAIMED = {
    "timm_coatnet": "flat at lr 3e-3; at 1e-2 every stage's change and the final norm's are flat (−0.04 … +0.09 at "
    "32 → 128, 8 seeds) but the classifier's change after 4 steps falls ∝ m^-0.33 while its first step is flat "
    "(−0.00): the readout's later steps, cause not found",
}
KNOWN = {name: pytest.mark.xfail(strict=True, reason=f"not claimed: {why}") for name, why in _NOT_CLAIMED.items()}
ZOO_NAMES = [n for n in ZOO if n not in REFUSED and n != "torch_transformer_head_dim"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=KNOWN.get(n, ())) for n in ZOO_NAMES])
def test_zoo_model_is_in_mup(name):
    arch = ZOO[name]
    base, wide = arch.widths or (BASE, WIDE)
    model = arch.build(wide)
    model.train()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    state = _untouchable_state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = parametrize(model, base=lambda: arch.build(base))  # the whole self-check, training included
    # parametrize and its self-check leave every buffer bit-identical, every mode, flag and the RNG as they were
    assert _untouchable_state(model) == state
    frozen.requires_grad_(True)
    # every parameter has one role; a tied tensor appears once, its other names as aliases
    assert sorted(record.params) == sorted(n for n, _ in model.named_parameters())
    aliases = [a for p in record.params.values() for a in p.tied]
    assert sorted([*record.params, *aliases]) == sorted(n for n, _ in model.named_parameters(remove_duplicate=False))

    tied = _tied_readouts(record)
    said = [str(w.message) for w in caught if "tied_readout='untie'" in str(w.message)]
    # the self-check warns about nothing else on a model in μP (a false alarm is a number the user would believe)
    assert not [str(w.message)[:200] for w in caught if "tied_readout='untie'" not in str(w.message)]
    assert not said or tied
    routers = _routers(record)
    for lr in LRS:  # (the initial attention logits are the same at both: measured at the first)
        variant = "untie" if tied else "keep"
        slopes, init_slopes = _run(name, True, lr, tied_readout=variant, init=lr == LRS[0])
        if routers:
            router_slopes, _ = _run(name, True, lr, ROUTER_SEEDS, tied_readout=variant, routers=routers, init=False)
            slopes.update({k: v for k, v in router_slopes.items() if k.startswith("Δrouter")})
        for key, (slope, predicted) in init_slopes.items():  # logits ∝ 1/d_head at init (d_head grows 4×: −½)
            assert abs(slope - predicted) <= BAR, (key, slope, predicted)
        off = _off(slopes)
        assert not off, f"μP sizes that change with width after {STEPS} Adam steps at lr {lr}: {off}"
        if tied and not said:  # a tie the self-check did not name must be flat as it is
            kept, _ = _run(name, True, lr, init=False)
            assert not _off(kept), f"a tied readout the self-check let pass is off the rule at lr {lr}: {_off(kept)}"
    if arch.sp_logits_grow:
        unmodified, _ = _run(name, False, LRS[-1], SEEDS[:2], steps=1, init=False)  # one Adam step: ∝ width
        growth = unmodified["Δlogits after one step"]
        assert growth > GROWTH, f"what one step adds to the unmodified model's logits does not grow: {growth:.3f}"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_zoo_model_that_cannot_be_supported_is_refused_with_the_fix(name):
    arch = ZOO[name]
    with pytest.raises(ValueError, match=REFUSED[name]):
        parametrize(arch.build(WIDE), base=lambda: arch.build(BASE))
