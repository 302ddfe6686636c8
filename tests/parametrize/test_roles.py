"""Roles inferred from shapes on every model family we claim, every parameter accounted for."""

import pytest
from models import bert, cnn, convnext, gpt2, llama, mlp, resnet, vit

from lightning_mup import parametrize

# (factory, base width, width, {parameter: expected role})
CASES = {
    "mlp": (
        mlp,
        32,
        128,
        {
            "features.0.weight": "input",
            "features.0.bias": "vector",
            "features.2.weight": "hidden",
            "readout.weight": "output",
            "readout.bias": "fixed",
        },
    ),
    "cnn": (
        cnn,
        8,
        32,
        {
            "conv1.weight": "input",
            "conv2.weight": "hidden",
            "dw.weight": "vector",
            "norm.weight": "vector",
            "fc.weight": "output",
            "fc.bias": "fixed",
        },
    ),
    "vit": (
        vit,
        32,
        128,
        {
            "patch_embed.proj.weight": "input",
            "cls_token": "input",
            "pos_embed": "input",
            "blocks.0.attn.qkv.weight": "hidden",
            "blocks.1.mlp.fc2.weight": "hidden",
            "blocks.0.norm1.weight": "vector",
            "head.weight": "output",
            "head.bias": "fixed",
        },
    ),
    "resnet": (
        resnet,
        16,
        32,
        {
            "conv1.weight": "fixed",
            "layer1.0.conv1.weight": "input",
            "layer1.0.conv2.weight": "hidden",
            "layer4.1.bn2.weight": "vector",
            "fc.weight": "output",
        },
    ),
    "convnext": (
        convnext,
        16,
        48,
        {
            "stem.0.weight": "input",
            "stages.0.blocks.0.conv_dw.weight": "vector",
            "stages.0.blocks.0.mlp.fc1.weight": "hidden",
            "stages.0.blocks.0.gamma": "vector",
            "head.fc.weight": "output",
        },
    ),
    "gpt2": (
        gpt2,
        32,
        128,
        {
            "transformer.wte.weight": "input",
            "transformer.wpe.weight": "input",
            "transformer.h.0.attn.c_attn.weight": "hidden",
            "transformer.h.1.mlp.c_proj.weight": "hidden",
            "transformer.ln_f.weight": "vector",
        },
    ),
    "llama": (
        llama,
        32,
        128,
        {
            "model.embed_tokens.weight": "input",
            "model.layers.0.self_attn.q_proj.weight": "hidden",
            "model.layers.1.mlp.down_proj.weight": "hidden",
            "model.norm.weight": "vector",
            "lm_head.weight": "output",
        },
    ),
    "bert": (
        bert,
        32,
        128,
        {
            "bert.embeddings.word_embeddings.weight": "input",
            "bert.embeddings.token_type_embeddings.weight": "input",
            "bert.encoder.layer.0.attention.self.query.weight": "hidden",
            "bert.encoder.layer.1.output.dense.weight": "hidden",
            "cls.predictions.transform.dense.weight": "hidden",
            "cls.predictions.bias": "fixed",
        },
    ),
}


@pytest.mark.parametrize("family", list(CASES))
def test_roles_and_every_parameter_accounted_for(family):
    make, base_width, width, expected = CASES[family]
    model = make(width)
    record = parametrize(model, base=lambda: make(base_width))

    names = [n for n, _ in model.named_parameters()]  # each tensor once (tied aliases dropped)
    assert list(record.params) == names
    roles = record.roles()
    for name, role in expected.items():
        assert roles[name] == role, (name, roles[name])
    ratio = width / base_width
    for name, p in record.params.items():
        if p.role in ("hidden", "output"):
            assert p.fan_in_mult == pytest.approx(ratio), name
        if p.role == "input":
            assert p.fan_out_mult == pytest.approx(ratio), name


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_tied_weights_reported_once_and_multiplied_at_the_readout(family):
    make, base_width, width, _ = CASES[family]
    model = make(width)
    record = parametrize(model, base=lambda: make(base_width))
    embedding = next(n for n in record.params if "wte" in n or "word_embeddings" in n)
    readout = "lm_head" if family == "gpt2" else "cls.predictions.decoder"
    assert record.params[embedding].tied == [f"{readout}.weight"]
    assert f"{readout}.weight" not in record.params
    # kept as the input tensor (not rescaled, not zeroed); the readout use gets 1/width_mult
    assert record.params[embedding].init_scale == 1.0
    hooks = [h for h in record.hooks if h.module == readout]
    assert [(h.kind, h.value) for h in hooks] == [("input", pytest.approx(base_width / width))]


def test_model_at_base_width_needs_delta():
    model = mlp(32)
    record = parametrize(model, base=lambda: mlp(32), delta=lambda: mlp(64))
    assert record.roles()["features.2.weight"] == "hidden"
    assert all(p.width_mult == 1.0 for p in record.params.values())
    assert all(p.init_scale in (0.0, 1.0) for p in record.params.values())  # base width: only the zeroed readout


def _mixtral(experts: int, width: int):
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=width,
        intermediate_size=width,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    return transformers.MixtralForCausalLM(config)


def test_more_experts_are_counted_not_width_and_the_router_stays_a_readout():
    """Experts 4 → 16 at one width: every expert tensor and the router keep their init and lr (nothing is width).
    Experts and width growing together: the router's 16 outputs are counted, so it is the hidden size's readout
    (zero, 1/m) — read off shapes alone it would be a hidden matrix with an SP-sized random init."""
    import transformers

    transformers.logging.set_verbosity_error()
    record = parametrize(_mixtral(16, 32), base=lambda: _mixtral(4, 32), check=False)
    moe = {n.split("mlp.")[1]: s for n, s in record.params.items() if ".mlp." in n}
    assert set(moe) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    for scale in moe.values():
        assert (scale.role, scale.init_scale, scale.lr_scale) == ("fixed", 1.0, {"sgd": 1.0, "adam": 1.0})
    both = parametrize(_mixtral(16, 128), base=lambda: _mixtral(4, 32), check=False)
    router = both.params["model.layers.0.mlp.gate.weight"]
    assert (router.role, router.init_scale, router.forward_mult, router.fan_in_mult) == ("output", 0.0, 0.25, 4.0)
    assert both.params["model.layers.0.mlp.experts.down_proj"].role == "hidden"
