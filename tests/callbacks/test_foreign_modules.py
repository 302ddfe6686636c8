"""Every callback at its defaults in LightningModules written as users write them (tests/foreign.py):
the value an independent reference gives, or a clear refusal before training — and a run whose
weights, metrics and logged values are bit-identical to the same run without callbacks."""

from __future__ import annotations

import copy
import csv
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from foreign import (
    CompiledInner,
    FrozenBackbone,
    HFCausalLM,
    HFMaskedLM,
    ImageDataset,
    ManualOptimization,
    PlainClassifier,
    TimmClassifier,
    TokenDataset,
    TwoOptimizers,
    VectorDataset,
    loader,
)
from lightning.pytorch.loggers import CSVLogger
from scipy.sparse.linalg import LinearOperator, eigsh
from torch.nn.attention import SDPBackend, sdpa_kernel
from trainers import quiet_trainer

from lightning_mup.callbacks import (
    AfterNTK,
    AttentionMaps,
    EnsembleLogits,
    FeatureKernels,
    MeasurementError,
    PreactivationHistograms,
    Sharpness,
    UpdateSizes,
)

STEPS = 4


@dataclass
class Case:
    module: Callable[[], Any]
    data: Callable[[], Any]
    network: Callable[[Any], torch.nn.Module]  # the LightningModule -> the network its step trains
    trainer: dict | None = None
    language_model: bool = False
    attention: bool = False


def _lm_criterion(out, batch):
    return out.loss


def _ce_criterion(out, batch):
    return F.cross_entropy(out, batch[1])


CASES = {
    "hf_gpt2_dict_batches": Case(HFCausalLM, lambda: TokenDataset(32), lambda m: m.model, None, True, True),
    "hf_bert_mlm": Case(HFMaskedLM, lambda: TokenDataset(32, masked=True), lambda m: m.model, None, True, True),
    "timm_vit_torchmetrics": Case(TimmClassifier, lambda: ImageDataset(32), lambda m: m.net, attention=True),
    "manual_optimization": Case(ManualOptimization, lambda: VectorDataset(32), lambda m: m.net),
    "two_optimizers": Case(TwoOptimizers, lambda: VectorDataset(32), lambda m: m),
    "gradient_accumulation": Case(
        PlainClassifier, lambda: VectorDataset(64), lambda m: m.net, {"accumulate_grad_batches": 2}
    ),
    "bf16_mixed": Case(PlainClassifier, lambda: VectorDataset(32), lambda m: m.net, {"precision": "bf16-mixed"}),
    "compiled_inner": Case(CompiledInner, lambda: VectorDataset(32), lambda m: m.net),
    "compiled_outer": Case(PlainClassifier, lambda: VectorDataset(32), lambda m: m.net),
    "frozen_batchnorm_backbone": Case(FrozenBackbone, lambda: ImageDataset(32), lambda m: m),
}


def _default_callbacks(case: Case) -> list:
    found = [Sharpness(), FeatureKernels(), PreactivationHistograms(), EnsembleLogits(), UpdateSizes(every_n_steps=2)]
    # AfterNTK's defaults refuse [B, T, V] outputs (tested below); an LM says which outputs it means
    found.append(AfterNTK(output_fn=lambda out: out.logits[:, -1]) if case.language_model else AfterNTK())
    return [*found, AttentionMaps()] if case.attention else found


def _fit(name: str, root, callbacks):
    case = CASES[name]
    torch.manual_seed(0)
    module = case.module()
    if name == "compiled_inner":  # inductor's C++ build costs minutes on CI; aot_eager is the same mechanism
        module.net = torch.compile(module.net._orig_mod, backend="aot_eager")
    initial = copy.deepcopy(module)
    fitted = torch.compile(module, backend="aot_eager") if name == "compiled_outer" else module
    trainer = quiet_trainer(root, STEPS, callbacks, logger=CSVLogger(root), log_every_n_steps=1, **(case.trainer or {}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|deprecated).*")
        trainer.fit(fitted, loader(case.data()))
    return module, initial, trainer


def _user_metrics(trainer) -> list[dict[str, str]]:
    """metrics.csv restricted to the columns the user's module logged (and the rows where it did)."""
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    own = ("train_", "seen_", "epoch_")
    mine = [{k: v for k, v in row.items() if k.startswith(own) or k in ("step", "epoch")} for row in rows]
    return [row for row in mine if any(v for k, v in row.items() if k.startswith(own))]


def _arrays(trainer, callback: str, step: int) -> dict[str, np.ndarray]:
    with np.load(f"{trainer.logger.log_dir}/{callback}/step_{step:08d}.npz") as data:
        return {k: data[k] for k in data.files if k != "probe_fingerprint"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case trained without callbacks and with every callback at its defaults, once for all tests."""
    found = {}
    for name, case in CASES.items():
        root = tmp_path_factory.mktemp(name)
        callbacks = _default_callbacks(case)
        found[name] = (_fit(name, root / "plain", []), _fit(name, root / "observed", callbacks), callbacks)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_callbacks_leave_the_run_bit_identical(runs, name):
    (plain, _, plain_trainer), (module, _, trainer), _ = runs[name]
    for key, value in plain.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    logged = _user_metrics(trainer)
    assert logged and logged == _user_metrics(plain_trainer)  # per-step and per-epoch values, counters
    if name == "frozen_batchnorm_backbone":
        assert not module.backbone.training  # kept in eval: AfterNTK's eval pass must not flip it back


@pytest.mark.parametrize("name", ["hf_gpt2_dict_batches", "hf_bert_mlm"])
def test_after_ntk_refuses_sequence_logits_before_training(tmp_path, name):
    with pytest.raises(MeasurementError, match=r"output has shape \(2, 8, 64\).*output_fn="):
        _fit(name, tmp_path, [AfterNTK()])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_callback_gives_the_reference_value(runs, name):
    case = CASES[name]
    _, (module, initial, trainer), callbacks = runs[name]
    by_type = {type(c).__name__: c for c in callbacks}
    batch = next(iter(loader(case.data())))  # the probe: the first training batch
    initial, final = _eager(initial), _eager(copy.deepcopy(module))
    if name == "frozen_batchnorm_backbone":
        initial.backbone.eval()  # as during training

    # Sharpness at step 0: an independent solve (torch.func HVPs, scipy eigsh to 1e-10) on the initial model
    sharpness = by_type["Sharpness"].series
    assert sharpness["step"][0] == 0 and sharpness["sharpness/converged"][0] == 1.0
    reference = _top_hessian_eigenvalue(case.network(initial), batch, case.language_model)
    assert sharpness["sharpness"][0] == pytest.approx(reference, rel=1e-3)

    # FeatureKernels and PreactivationHistograms at step 0: hand computations on the initial model
    kernels, preactivations = _arrays(trainer, "feature_kernels", 0), _arrays(trainer, "preactivations", 0)
    stream = sorted(k[4:] for k in kernels if k.startswith("phi/"))
    inputs_of = sorted(k[8:] for k in preactivations if k.startswith("samples/"))
    assert stream and inputs_of
    outputs, grads, inputs = _hand_run(initial, case, batch, stream, inputs_of)
    for layer in stream:
        phi = outputs[layer].reshape(len(outputs[layer]), -1).double()
        np.testing.assert_allclose(kernels[f"phi/{layer}"], (phi @ phi.T / phi.shape[1]).numpy(), rtol=1e-5, atol=1e-7)
        if layer in grads:
            g = (grads[layer] * len(grads[layer])).reshape(len(grads[layer]), -1).double()
            np.testing.assert_allclose(kernels[f"grad/{layer}"], (g @ g.T * g.shape[1]).numpy(), rtol=1e-4, atol=1e-9)
    points = by_type["PreactivationHistograms"].points
    for layer in inputs_of:
        expected = inputs[layer][:points].reshape(min(points, len(inputs[layer])), -1).numpy()
        if expected.shape[1] <= by_type["PreactivationHistograms"].max_samples:
            np.testing.assert_allclose(preactivations[f"samples/{layer}"], expected, rtol=1e-5, atol=1e-6)

    # EnsembleLogits: the network's eval-mode logits on the probe, at step 0
    saved = _arrays(trainer, "ensemble_logits", 0)
    logits, targets = _eval_logits(initial, case, batch, causal=name == "hf_gpt2_dict_batches")
    np.testing.assert_array_equal(saved["targets"], targets.numpy())
    np.testing.assert_allclose(
        saved["logits"][0], logits.double().numpy().reshape(len(logits), -1), rtol=1e-5, atol=1e-6
    )

    # AfterNTK at the end: Σ_c ∇f_c·∇f_cᵀ from per-point Jacobians of the trained network; f₀ at init
    ntk = by_type["AfterNTK"]
    after = _arrays(trainer, "after_ntk", trainer.global_step)
    expected = _jacobian_gram(case.network(final), batch, ntk.output_fn)
    np.testing.assert_allclose(after["kernel"], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    with torch.no_grad():
        network = case.network(initial).eval()
        f0 = ntk.output_fn(network(**_inputs(batch)) if isinstance(batch, dict) else network(batch[0]))
    np.testing.assert_allclose(ntk.initial_outputs.numpy(), f0.double().numpy(), rtol=1e-5, atol=1e-6)

    if case.attention:  # AttentionMaps: rows of probabilities for every attention layer
        maps = _arrays(trainer, "attention_maps", 0)
        assert len(maps) == 2 and all(np.allclose(m.sum(-1), 1, atol=1e-5) for m in maps.values())


# ------------------------------------------------------------------------------------------ references
def _eager(module):
    """The module with compile wrappers removed, for the reference computations."""
    for name, child in list(module.named_children()):
        if type(child).__name__ == "OptimizedModule":
            setattr(module, name, child._orig_mod)
    return module


def _inputs(batch: dict) -> dict:
    return dict(batch)


def _loss(network, params, batch, language_model: bool):
    if language_model:
        return torch.func.functional_call(network, params, (), dict(batch)).loss
    return F.cross_entropy(torch.func.functional_call(network, params, (batch[0],)), batch[1])


def _top_hessian_eigenvalue(network, batch, language_model: bool) -> float:
    params = {n: p.detach() for n, p in network.named_parameters() if p.requires_grad}
    names = list(params)
    dim = sum(p.numel() for p in params.values())

    def hvp(v: np.ndarray) -> np.ndarray:
        tangents, offset = {}, 0
        for n in names:
            size = params[n].numel()
            tangents[n] = torch.as_tensor(v[offset : offset + size], dtype=torch.float32).view(params[n].shape)
            offset += size
        with sdpa_kernel(SDPBackend.MATH):
            grad = torch.func.grad(lambda p: _loss(network, p, batch, language_model))
            _, out = torch.func.jvp(grad, (params,), (tangents,))
        return torch.cat([out[n].reshape(-1) for n in names]).double().numpy()

    operator = LinearOperator((dim, dim), matvec=hvp, dtype=np.float64)
    return float(eigsh(operator, k=1, which="LA", tol=1e-10, ncv=30)[0][0])


def _hand_run(module, case: Case, batch, stream: list[str], inputs_of: list[str]):
    """The training loss on the probe with the named modules' outputs, their loss gradients and the named
    activations' inputs caught by hand."""
    named = dict(module.named_modules())
    outputs, inputs, handles = {}, {}, []
    for layer in stream:
        handles.append(named[layer].register_forward_hook(lambda m, a, out, n=layer: outputs.__setitem__(n, out)))
    for layer in inputs_of:
        handles.append(named[layer].register_forward_pre_hook(lambda m, a, n=layer: inputs.__setitem__(n, a[0])))
    network = case.network(module)
    params = dict(network.named_parameters())
    with sdpa_kernel(SDPBackend.MATH):
        loss = _loss(network, params, batch, case.language_model)
    for h in handles:
        h.remove()
    outputs = {k: (v[0] if isinstance(v, tuple) else v) for k, v in outputs.items()}
    live = [k for k, v in outputs.items() if v.requires_grad]
    grads = dict(zip(live, torch.autograd.grad(loss, [outputs[k] for k in live]))) if live else {}
    return {k: v.detach() for k, v in outputs.items()}, grads, {k: v.detach() for k, v in inputs.items()}


def _eval_logits(module, case: Case, batch, causal: bool):
    network = case.network(module).eval()
    with torch.no_grad():
        out = network(**batch) if isinstance(batch, dict) else network(batch[0])
    logits = getattr(out, "logits", out)
    if not isinstance(batch, dict):
        return logits, batch[1]
    labels = batch["labels"]
    if causal:  # HF's causal-LM loss: logits at t score the label at t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels.reshape(-1) != -100
    logits, labels = logits.reshape(-1, logits.shape[-1])[keep], labels.reshape(-1)[keep]
    assert F.cross_entropy(logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-5)  # the same pairing
    return logits, labels


def _jacobian_gram(network, batch, output_fn) -> np.ndarray:
    network = network.eval()
    params = {n: p.detach() for n, p in network.named_parameters() if p.requires_grad}
    points = len(batch["input_ids"]) if isinstance(batch, dict) else len(batch[0])
    rows = []
    for i in range(points):

        def f(p, i=i):
            with sdpa_kernel(SDPBackend.MATH):
                if isinstance(batch, dict):
                    out = torch.func.functional_call(network, p, (), {k: v[i : i + 1] for k, v in batch.items()})
                else:
                    out = torch.func.functional_call(network, p, (batch[0][i : i + 1],))
            return output_fn(out)[0]

        jacobian = torch.func.jacrev(f)(params)
        rows.append(torch.cat([jacobian[n].reshape(jacobian[n].shape[0], -1) for n in params], dim=1))
    j = torch.stack(rows).double()  # [P, C, D]
    return torch.einsum("pcd,qcd->pq", j, j).numpy()
