"""Model-family knowledge, keyed by module type, so the core never branches on a family.

Three registries:

* :data:`LAYERS` — where a layer's fan-in and fan-out live in its weight tensors, and whether a forward
  multiplier can be applied by scaling the layer's (single) input. Users extend it with :func:`register_layer`.
* :data:`BLOCKS` — residual blocks and the modules that end each residual branch (depth scaling
  multiplies those modules' outputs). Users extend it with :func:`register_block` or pass
  ``residual_blocks={"glob": ["branch_end", ...]}`` to :func:`~lightning_mup.parametrize`.
* attention — how the logit scale is changed where it takes effect: HF transformers' ``module.scaling``
  (read by eager, sdpa and flash paths alike), and timm's ``q_norm`` output, because timm's fused path
  calls ``scaled_dot_product_attention`` without ``scale=`` and ignores ``module.scale``.

Types are matched by fully qualified name along the MRO, so nothing here imports timm or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn


def type_names(module: nn.Module) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(module).__mro__}


# ---------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class LayerKind:
    """Layout of a layer's weight: which dim is fan-out / fan-in, and the matmul's fan-in."""

    out_dim: int
    in_dim: int
    fan_in: Callable[[nn.Module], int]
    scalable_input: bool  # y = W(c·x) + b equals scaling W by c (not true for lookups)


def _conv_fan_in(m: nn.Module) -> int:
    return m.weight.shape[1] * math.prod(m.weight.shape[2:])


def _conv_transpose_fan_in(m: nn.Module) -> int:
    return m.weight.shape[0] // m.groups * math.prod(m.weight.shape[2:])


# (layer type, parameter attribute, layout); the first match along the type's MRO wins, later registrations first
LAYERS: list[tuple[str, str, LayerKind]] = [
    ("torch.nn.modules.linear.Linear", "weight", LayerKind(0, 1, lambda m: m.in_features, True)),
    ("torch.nn.modules.conv._ConvTransposeNd", "weight", LayerKind(1, 0, _conv_transpose_fan_in, True)),
    ("torch.nn.modules.conv._ConvNd", "weight", LayerKind(0, 1, _conv_fan_in, True)),
    ("transformers.pytorch_utils.Conv1D", "weight", LayerKind(1, 0, lambda m: m.weight.shape[0], True)),
    ("torch.nn.modules.sparse.Embedding", "weight", LayerKind(1, 0, lambda m: 1, False)),
    ("torch.nn.modules.sparse.EmbeddingBag", "weight", LayerKind(1, 0, lambda m: 1, False)),
]


def register_layer(
    layer: type | str, attrs: Sequence[str] = ("weight",), *, out_dim: int = -2, in_dim: int = -1
) -> None:
    """Teach lightning_mup a layer type whose weights it does not know: which dimension of each named parameter
    is its fan-out and which its fan-in (any other leading dimensions count stacked matrices — a recurrent
    layer's gates, experts). Example: a gated recurrent cell holding ``w_ih`` and ``w_hh`` of shape
    ``[3, hidden, in]``::

        lightning_mup.register_layer(MyGRUCell, ("w_ih", "w_hh"), out_dim=1, in_dim=2)

    Its fan-in is the size of ``in_dim``; a forward multiplier is never put on its input (the layer may use its
    input more than once), so under ``mf`` such a tensor needs ``parametrization="mup"``."""
    name = layer if isinstance(layer, str) else f"{layer.__module__}.{layer.__qualname__}"
    if out_dim == in_dim:
        raise ValueError(f"register_layer({name}): out_dim and in_dim are both {out_dim}")
    for attr in attrs:

        def fan_in(module: nn.Module, attr: str = attr) -> int:
            return getattr(module, attr).shape[in_dim]

        LAYERS.insert(0, (name, attr, LayerKind(out_dim, in_dim, fan_in, False)))


def layer_kind(module: nn.Module, attr: str) -> LayerKind | None:
    """The layout of ``module.<attr>`` if it is the weight of a known layer, else ``None``."""
    names = type_names(module)
    for name, layer_attr, kind in LAYERS:
        if layer_attr == attr and name in names:
            if kind.out_dim < 0 or kind.in_dim < 0:  # registered counting from the end of the shape
                ndim = getattr(module, attr).dim()
                return LayerKind(kind.out_dim % ndim, kind.in_dim % ndim, kind.fan_in, kind.scalable_input)
            return kind
    if attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight") and isinstance(
        module, nn.MultiheadAttention
    ):
        return LayerKind(0, 1, lambda m: m.embed_dim, False)
    return None


def is_depthwise(module: nn.Module) -> bool:
    """A grouped conv with one input channel per group: per-channel weights, vector-like in width."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


# ---------------------------------------------------------------------------------------------- blocks
BranchEnds = Callable[[nn.Module], list[str]]
BLOCKS: dict[str, BranchEnds] = {}


def register_block(type_name: str, branch_ends: BranchEnds | Sequence[str]) -> None:
    """Teach depth scaling a residual block type.

    ``type_name`` is the block's fully qualified class name (``f"{cls.__module__}.{cls.__qualname__}"``);
    ``branch_ends`` lists the submodules (relative names) whose output is the residual branch F(h)
    just before ``h + F(h)``, or a function of the block returning them.
    """
    BLOCKS[type_name] = branch_ends if callable(branch_ends) else (lambda m, ends=tuple(branch_ends): list(ends))


def _present(*names: str) -> BranchEnds:
    def ends(block: nn.Module) -> list[str]:
        return [n for n in names if _get(block, n) is not None]

    return ends


def _resnet_branch_end(last_norm: str) -> BranchEnds:
    # drop_path and SE come after the last norm; multiply after whichever runs last
    # (DropPath is linear in its input; squeeze-excitation is not).
    def ends(block: nn.Module) -> list[str]:
        for name in ("drop_path", "se", last_norm):
            if isinstance(getattr(block, name, None), nn.Module):
                return [name]
        raise ValueError(f"{type(block).__name__} has no {last_norm}: cannot find its residual branch end")

    return ends


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


register_block("timm.models.vision_transformer.Block", ["drop_path1", "drop_path2"])
register_block("timm.models.vision_transformer.ResPostBlock", ["drop_path1", "drop_path2"])
register_block("timm.models.vision_transformer.ParallelScalingBlock", ["drop_path"])
register_block("timm.models.convnext.ConvNeXtBlock", ["drop_path"])
register_block("timm.models.resnet.BasicBlock", _resnet_branch_end("bn2"))
register_block("timm.models.resnet.Bottleneck", _resnet_branch_end("bn3"))
register_block(
    "transformers.models.gpt2.modeling_gpt2.GPT2Block",
    _present("attn.c_proj", "crossattention.c_proj", "mlp.c_proj"),
)
register_block("transformers.models.llama.modeling_llama.LlamaDecoderLayer", ["self_attn.o_proj", "mlp.down_proj"])
register_block(
    "transformers.models.bert.modeling_bert.BertLayer",
    _present("attention.output.dense", "crossattention.output.dense", "output.dense"),
)


def block_branch_ends(module: nn.Module) -> list[str] | None:
    """Branch-end submodule names if ``module`` is a registered residual block, else ``None``."""
    for name in type_names(module):
        if name in BLOCKS:
            return BLOCKS[name](module)
    return None


# ------------------------------------------------------------------------------------------- attention
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")


def head_dim(module: nn.Module) -> int | None:
    """The per-head dimension of an attention module, if it declares one (or a fused ``qkv`` projection and
    ``num_heads`` say it, as in timm's Swin and BEiT). Attention found only by the self-check's measurement
    needs none of this: it reads the head dimension off the logits' contraction."""
    for attr in HEAD_DIM_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    heads, qkv = getattr(module, "num_heads", None), getattr(module, "qkv", None)
    if isinstance(heads, int) and heads > 0 and isinstance(qkv, nn.Linear) and qkv.out_features % (3 * heads) == 0:
        return qkv.out_features // (3 * heads)
    return None


# Logit-scale attributes read at call time, as plain floats: HF's ``scaling`` (passed to every attention backend,
# set from a config constant in some families: Granite's attention_multiplier), BLOOM's ``inv_norm_factor`` (the
# ``alpha`` of its ALiBi ``baddbmm``)
_SCALE_ATTRIBUTES = ("scaling", "inv_norm_factor")


def attention_scale(module: nn.Module) -> float | None:
    """The logit scale an attention module applies, where it is a plain float attribute its forward reads (HF
    ``scaling``, BLOOM ``inv_norm_factor``, timm and CLIP ``scale``); None where none is (T5: no scale at all)."""
    for attr in (*_SCALE_ATTRIBUTES, "scale"):
        value = getattr(module, attr, None)
        # (1.0: no scale in the forward — T5 folds 1/√d_kv into its query's init: not a scale to read)
        if isinstance(value, float) and value != 1.0:
            return value
    return None


def attention_scale_hook(module: nn.Module, name: str, factor: float) -> tuple[str, str, float, str] | None:
    """How to multiply this attention module's logits by ``factor`` so that it takes effect, as
    (module, hook kind, value, reason) — or None when its scale is computed where nothing reaches it."""
    for attr in _SCALE_ATTRIBUTES:  # read at call time by every backend
        if isinstance(getattr(module, attr, None), float):
            return name, attr, getattr(module, attr) * factor, "attention 1/d_head"
    scale = getattr(module, "scale", None)
    if isinstance(scale, float) and isinstance(getattr(module, "q_norm", None), nn.Module):
        # timm: q_norm's output is where the fused and eager paths meet
        return f"{name}.q_norm", "output", factor, "attention 1/d_head (query)"
    if isinstance(scale, float) and isinstance(getattr(module, "fused_attn", None), bool):
        # timm attention without q_norm (Swin, BEiT): the fused path ignores ``scale``, the eager path reads it
        return name, "eager_scale", scale * factor, "attention 1/d_head (timm's eager attention)"
    if isinstance(scale, float):  # HF modules that pass scaling=self.scale at call time (CLIP)
        return name, "scale", scale * factor, "attention 1/d_head"
    for query in ("q", "q_proj", "query", "query_proj"):  # a separate query projection (T5, DeBERTa): scale q
        if isinstance(getattr(module, query, None), nn.Linear):
            return f"{name}.{query}", "output", factor, "attention 1/d_head (query projection)"
    return None


def is_attention(module: nn.Module) -> bool:
    """Whether a module looks like an attention layer: a head dimension or head count it declares,
    ``nn.MultiheadAttention``, or a class named for attention — the candidates whose forwards are watched for
    attention logits (by the self-check) and probabilities (by AttentionMaps)."""
    if head_dim(module) is not None or isinstance(module, nn.MultiheadAttention):
        return True
    if any(isinstance(getattr(module, a, None), int) for a in ("num_heads", "num_attention_heads", "n_head", "heads")):
        return True
    return any(word in type(module).__name__.lower() for word in ("attention", "attn"))
