"""Bad input stops early with one clear error saying what to do."""

import pytest
import torch
from models import mlp, residual_mlp
from torch import nn

from lightning_mup import parametrize


def test_base_identical_in_shape():
    with pytest.raises(ValueError, match="no parameter differs in shape.*delta="):
        parametrize(mlp(32), base=lambda: mlp(32))


def test_base_with_different_parameter_names():
    with pytest.raises(ValueError, match="named differently.*features.4"):
        parametrize(mlp(64, depth=4), base=lambda: mlp(32, depth=3))


def test_unknown_parametrization():
    with pytest.raises(ValueError, match="unknown parametrization 'mu-p'.*'mf', 'mup', 'ntk', 'sp'"):
        parametrize(mlp(64), base=lambda: mlp(32), parametrization="mu-p")


@pytest.mark.parametrize("alpha", [-0.5, 0.3, 1.5])  # 0 is allowed: no depth scaling
def test_depth_alpha_outside_range(alpha):
    with pytest.raises(ValueError, match=r"outside \[0.5, 1\]"):
        parametrize(residual_mlp(64), base=lambda: residual_mlp(32), depth_alpha=alpha)


class _SquashedBranch(nn.Module):
    """h + tanh(W h): residual, but the branch does not end in a layer that depth scaling can scale."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.fc(h))


class _SquashedNet(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.layers = nn.ModuleList(_SquashedBranch(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_depth_scaling_without_residual_blocks():
    with pytest.raises(ValueError, match=r"no residual block.*\['layers.0', 'layers.1'.*residual_blocks="):
        parametrize(_SquashedNet(64, 8), base=lambda: _SquashedNet(32, 2), depth_alpha=0.5)


def test_shallower_base_without_depth_alpha():
    with pytest.raises(ValueError, match="pass depth_alpha"):
        parametrize(residual_mlp(64, 8), base=lambda: residual_mlp(32, 2), residual_blocks={"blocks.*": ["out"]})


class TorchAttentionModel(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.attn = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h)[0])


def test_attention_that_cannot_be_patched():
    with pytest.raises(ValueError, match="MultiheadAttention.*head_dim 8→32.*grow the number of heads"):
        parametrize(TorchAttentionModel(64), base=lambda: TorchAttentionModel(16))
    # keeping 1/sqrt(head_dim) is an explicit, documented choice
    record = parametrize(TorchAttentionModel(64), base=lambda: TorchAttentionModel(16), attention="unchanged")
    assert record.settings["attention"] == "unchanged"


def test_bad_option_values():
    with pytest.raises(ValueError, match="weight_decay='l2'"):
        parametrize(mlp(64), base=lambda: mlp(32), weight_decay="l2")
    with pytest.raises(ValueError, match="lr_mults has unknown roles"):
        parametrize(mlp(64), base=lambda: mlp(32), lr_mults={"embedding": 2.0})
    with pytest.raises(TypeError, match="zero-argument factory"):
        parametrize(mlp(64), base=32)


def test_mean_field_with_tied_weights_is_refused():
    from models import gpt2

    with pytest.raises(ValueError, match="Untie them"):
        parametrize(gpt2(64), base=lambda: gpt2(32), parametrization="mf")
    assert torch.is_grad_enabled()


def test_gamma0_outside_the_mean_field_form_is_refused():
    with pytest.raises(ValueError, match="gamma0=0.5 has no effect here.*parametrization='mf'"):
        parametrize(mlp(64), base=lambda: mlp(32), gamma0=0.5)


def test_a_base_the_model_code_rejects_says_it_is_the_base():
    from models import gpt2

    with pytest.raises(ValueError, match="building the base model failed: .*divisible by the number of heads"):
        parametrize(gpt2(64), base=lambda: gpt2(30))  # 4 heads do not divide 30


def test_the_role_map_ignores_compile_wrappers():
    compiled = nn.Sequential(torch.compile(mlp(64), backend="eager"))
    record = parametrize(compiled, base=lambda: nn.Sequential(mlp(32)))
    assert set(record.params) == {n.replace("_orig_mod.", "") for n, _ in compiled.named_parameters()}
    record.attach(compiled)  # the same record fits the wrapped model


def test_a_module_without_parameters_is_named_as_such():
    with pytest.raises(ValueError, match="has no parameters, so there is nothing to parametrize"):
        parametrize(nn.ReLU(), base=lambda: nn.ReLU())


def test_a_model_narrower_than_its_base_is_said():
    with pytest.warns(UserWarning, match=r"narrower than its base \(width× 0.25\).*base= describes the small"):
        record = parametrize(mlp(16), base=lambda: mlp(64))
    assert any("narrower than its base" in note for note in record.notes)


def test_the_options_are_one_checked_frozen_settings_type():
    import dataclasses

    from lightning_mup import MuPSettings

    settings = MuPSettings(parametrization="mf", gamma0=2.0, lr_mults={"input": 2.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.gamma0 = 3.0
    with pytest.raises(ValueError, match="gamma0=0.5 has no effect here"):
        MuPSettings(gamma0=0.5)
    with pytest.raises(TypeError, match=r"unknown μP option\(s\) \['gama0'\]"):
        MuPSettings.from_options({"gama0": 1.0})
    record = parametrize(mlp(64), base=lambda: mlp(32), check=False, **settings.options())
    assert record.parametrization == "mf" and record.settings == settings.applied()
    assert record.settings["readout_zero_init"] is False  # the form's default, filled in
    assert set(MuPSettings.LIMIT_FIELDS) <= set(MuPSettings.names())


def test_every_entry_point_takes_exactly_the_settings_fields_with_their_defaults():
    """The keywords of parametrize and MuPStrategy mirror MuPSettings (the CLI needs them in the signature): an
    option added to MuPSettings and not to an entry point, or with another default there, fails here."""
    import dataclasses
    import inspect

    from lightning_mup import MuPSettings
    from lightning_mup.strategy import _MuP

    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(MuPSettings)
    }
    for entry in (parametrize, _MuP.__init__):
        parameters = inspect.signature(entry).parameters
        missing = sorted(set(defaults) - set(parameters))
        assert not missing, f"{entry.__qualname__} lacks the MuPSettings option(s) {missing}"
        for name, default in defaults.items():
            given = parameters[name].default
            assert (given or {}) == default if name == "lr_mults" else given == default, (entry.__qualname__, name)
