"""The role map: plain-typed, re-attachable without touching weights, and what it says it did."""

import json
import pickle

import pytest
import torch
from models import gpt2, mlp, vit

from lightning_mup import Parametrization, parametrize


def test_round_trip_through_json_and_reattach_to_a_fresh_model():
    torch.manual_seed(1)
    model = gpt2(64)
    record = parametrize(model, base=lambda: gpt2(32))
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = model(tokens).logits

    restored = Parametrization.from_dict(json.loads(json.dumps(record.to_dict())))
    assert restored == record
    fresh = gpt2(64)
    fresh.load_state_dict(model.state_dict())
    before = {n: p.clone() for n, p in fresh.state_dict().items()}
    restored.attach(fresh)
    assert all(torch.equal(before[n], p) for n, p in fresh.state_dict().items())  # weights untouched
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, expected, rtol=0, atol=0)

    restored.attach(fresh)  # idempotent: hooks replaced, not stacked
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, expected, rtol=0, atol=0)


def test_parametrized_model_pickles_and_refuses_a_second_parametrize():
    model = vit(64)
    parametrize(model, base=lambda: vit(32))
    copy = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))
    with pytest.raises(RuntimeError, match="already parametrized"):
        parametrize(model, base=lambda: vit(32))


def test_record_refuses_a_model_of_another_width():
    model = mlp(64)
    record = parametrize(model, base=lambda: mlp(16))
    with pytest.raises(ValueError, match="different width"):
        record.attach(mlp(32))


def test_base_is_built_without_touching_the_callers_random_stream():
    torch.manual_seed(5)
    parametrize(mlp(64), base=lambda: mlp(16))
    after = torch.rand(3)
    torch.manual_seed(5)
    mlp(64)
    torch.testing.assert_close(after, torch.rand(3))


def test_init_scales_follow_the_rule_exactly():
    # timm ViT draws hidden weights with a fixed std (0.02): μP needs 1/sqrt(fan_in) from the base.
    torch.manual_seed(0)
    model = vit(128)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = parametrize(model, base=lambda: vit(32))
    for name, p in model.named_parameters():
        scale = record.params[name].init_scale
        torch.testing.assert_close(p.detach(), raw[name] * scale)
    assert record.params["blocks.0.mlp.fc1.weight"].init_scale == pytest.approx(0.5)  # (32/128)^1/2 exactly
    assert record.params["pos_embed"].init_scale == 1.0
    assert record.params["head.weight"].init_scale == 0.0  # zero readout
    # PyTorch's default Linear init already scales as 1/sqrt(fan_in): hidden weights stay, biases are
    # lifted back to a width-independent size (as `mup` does for its readout bias).
    model = mlp(256)
    record = parametrize(model, base=lambda: mlp(64))
    assert record.params["features.2.weight"].init_scale == 1.0
    assert record.params["features.2.bias"].init_scale == pytest.approx(2.0)
    assert record.params["readout.bias"].init_scale == pytest.approx(2.0)
    assert all(n.startswith("self-check") for n in record.notes)  # nothing measured or assumed but the check


def test_keep_weights_preserves_the_function():
    model = mlp(64)
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = model(x)
    record = parametrize(model, base=lambda: mlp(16), keep_weights=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert record.params["readout.weight"].init_scale == pytest.approx(4.0)  # ÷ its multiplier 1/4
    assert record.params["readout.weight"].lr_scale["adam"] == 1.0


def test_summary_names_every_role():
    record = parametrize(mlp(64), base=lambda: mlp(16))
    text = record.summary()
    for role in ("input", "hidden", "output", "vector", "fixed"):
        assert role in text
    assert "readout multiplier" in text


@pytest.mark.parametrize("order", ["twin_compiled_first", "parametrized_after_compile"])
def test_torch_compile_sees_the_multipliers(order):
    """dynamo skips hook guards by default: a graph compiled without the μP hooks must not be reused."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    if order == "twin_compiled_first":
        torch.compile(mlp(64), backend="eager")(x)  # an unmodified instance of the same class
        model = mlp(64)
        parametrize(model, base=lambda: mlp(16), readout_zero_init=False)
        compiled = torch.compile(model, backend="eager")
    else:
        model = mlp(64)
        compiled = torch.compile(model, backend="eager")
        compiled(x)
        parametrize(model, base=lambda: mlp(16), readout_zero_init=False)
    expected = model(x)
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
