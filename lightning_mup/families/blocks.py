"""Residual blocks: where they are, which modules end their branches, and how deep the model is.

:data:`BLOCKS` knows the branch ends of named block types; users extend it with :func:`register_block` or pass
``residual_blocks={"glob": ["branch_end", ...]}`` to :func:`~lightning_mup.parametrize`. Other blocks are found by
tracing their forward for ``h + F(h)``.

Depth scaling (h + m_L^-α · F(h)) multiplies each branch end's output; the depth multiplier is
m_L = L / L_base with L the number of residual blocks. A base built shallower than the model is
matched block by block (block i of a container ↔ base block i mod its count there), so base and delta
stay small in depth as well as width.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_mup._names import glob_match, join, nearest
from lightning_mup.families.layers import type_names

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


@dataclass
class Blocks:
    names: list[str]  # residual block modules, in module order
    branch_ends: dict[str, list[str]]  # block name -> absolute names of the modules ending its branches
    found_by: str = "adapters"  # "adapters", "residual_blocks" or "structure" (x + f(x) read off the forward)
    ambiguous: list[str] = field(default_factory=list)  # x + f(x) blocks whose branch end could not be told

    @property
    def depth(self) -> int:
        return len(self.names)

    def block_of(self, name: str) -> str | None:
        for block in self.names:
            if name == block or name.startswith(block + "."):
                return block
        return None


def find_blocks(model: nn.Module, residual_blocks: Mapping[str, Sequence[str]] | None = None) -> Blocks:
    """Residual blocks from user patterns (``{"layers.*": ["fc2"]}``), from the registered adapters, or —
    for a hand-written model neither knows — from the structure of the forward (:func:`structural_blocks`)."""
    found = _declared_blocks(model, residual_blocks)
    if found.names or residual_blocks is not None:
        return found
    return structural_blocks(model)


_BRANCH_END_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPARENT = (nn.Dropout, nn.Identity)
_ADDS = {operator.add, operator.iadd, torch.add}


def structural_blocks(model: nn.Module) -> Blocks:
    """Residual blocks read off the forward: an element of a ModuleList / Sequential whose traced forward
    (torch.fx) adds to its input — or to an earlier residual sum — the output of a Linear or Conv (through
    dropout; the last layer of a Sequential branch counts), i.e. ``h + W(...)``: pre-LN, post-LN
    (``norm(h + W(...))``) and two-branch transformer blocks alike. Blocks whose ``h + f(h)`` ends in
    something else are listed as ambiguous. Models that do not trace are left alone."""
    modules = dict(model.named_modules())
    names, ends, ambiguous = [], {}, []
    for name, module in modules.items():
        if not name or not name.rpartition(".")[2].isdigit() or any(name.startswith(b + ".") for b in names):
            continue
        parent = modules.get(name.rpartition(".")[0] if "." in name else "")
        if not isinstance(parent, nn.ModuleList | nn.Sequential):
            continue
        found = _residual_branch_ends(module)
        if found is None:
            continue
        if found:
            names.append(name)
            ends[name] = [join(name, r) for r in found]
        else:
            ambiguous.append(name)
    return Blocks(names, ends, "structure", ambiguous)


_TRACED: dict[tuple, list[str] | None] = {}  # block structure -> its branch ends (a trace costs tens of ms)


def _residual_branch_ends(block: nn.Module) -> list[str] | None:
    """Branch ends of ``block`` if its forward is residual; [] if residual with an unclear branch end;
    None if it is not residual (or does not trace). Remembered by the block's structure — the types of it and its
    submodules and their plain attributes (a forward may branch on ``self.has_skip``): the same block drawn
    again (another seed, the base draws of the self-check) is not traced again."""
    key = tuple((n, type(m), _plain_attributes(m)) for n, m in block.named_modules())
    if key not in _TRACED:
        if len(_TRACED) > 4096:
            _TRACED.clear()
        _TRACED[key] = _traced_branch_ends(block)
    found = _TRACED[key]
    return None if found is None else list(found)


def _plain_attributes(module: nn.Module) -> tuple:
    plain = (bool, int, float, str, type(None))
    return tuple((k, v) for k, v in vars(module).items() if isinstance(v, plain) and k != "training")


def _traced_branch_ends(block: nn.Module) -> list[str] | None:
    try:
        graph = torch.fx.symbolic_trace(block).graph
    except Exception:
        return None
    submodules = dict(block.named_modules())
    stream = {n for n in graph.nodes if n.op == "placeholder"}  # the residual stream: the input, then each sum
    ends: list[str] = []
    residual = False
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADDS) or (
            node.op == "call_method" and node.target in ("add", "add_", "__iadd__")
        )
        if not is_add or len(node.args) < 2:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if len(operands) != 2 or not any(a in stream for a in operands):
            continue
        branch = next(a for a in operands if a not in stream) if not all(a in stream for a in operands) else None
        if branch is None:
            continue
        residual = True
        stream.add(node)
        end = _branch_end(branch, submodules)
        if end is None:
            return []
        ends.append(end)
    return ends if residual else None


def _branch_end(node, submodules: Mapping[str, nn.Module]) -> str | None:
    while node.op == "call_module" and isinstance(submodules.get(node.target), _TRANSPARENT):
        node = node.args[0]
    if node.op != "call_module":
        return None
    module = submodules.get(node.target)
    if isinstance(module, _BRANCH_END_TYPES):
        return node.target
    if isinstance(module, nn.Sequential):
        layers = [(n, m) for n, m in module.named_children() if not isinstance(m, _TRANSPARENT)]
        if layers and isinstance(layers[-1][1], _BRANCH_END_TYPES):
            return f"{node.target}.{layers[-1][0]}"
    return None


def _declared_blocks(model: nn.Module, residual_blocks: Mapping[str, Sequence[str]] | None) -> Blocks:
    modules = dict(model.named_modules())
    names: list[str] = []
    ends: dict[str, list[str]] = {}
    for name, module in modules.items():
        if not name or any(name.startswith(b + ".") for b in names):
            continue
        if residual_blocks is not None:
            relative = next((list(v) for p, v in residual_blocks.items() if glob_match(p, name)), None)
        else:
            relative = block_branch_ends(module)
        if relative is None:
            continue
        absolute = [join(name, r) for r in relative]
        missing = [a for a in absolute if a not in modules]
        if missing:
            raise ValueError(
                f"residual block {name}: branch-end modules {missing} do not exist; "
                f"submodules of the block include {nearest(missing[0], [m for m in modules if m.startswith(name)])}"
            )
        names.append(name)
        ends[name] = absolute
    if residual_blocks is not None and not names:
        raise ValueError(
            f"residual_blocks patterns {list(residual_blocks)} match no module; module names look like "
            f"{[n for n in modules if n][:8]}"
        )
    return Blocks(names, ends, "adapters" if residual_blocks is None else "residual_blocks")


def base_name_mapper(model_blocks: Blocks, base_blocks: Blocks) -> Callable[[str], str] | None:
    """Map model names onto a shallower (or deeper) base's names; ``None`` when depths agree."""
    if model_blocks.names == base_blocks.names:
        return None
    base_by_container: dict[str, list[str]] = {}
    for block in base_blocks.names:
        base_by_container.setdefault(_container(block), []).append(block)
    block_map: dict[str, str] = {}
    position: dict[str, int] = {}
    for block in model_blocks.names:
        container = _container(block)
        candidates = base_by_container.get(container)
        if not candidates:
            raise ValueError(
                f"block {block} has no counterpart in the base (base blocks: {base_blocks.names[:6]}); "
                "build the base with the same block structure"
            )
        i = position.get(container, 0)
        block_map[block] = candidates[i % len(candidates)]
        position[container] = i + 1

    def to_base(name: str) -> str:
        block = model_blocks.block_of(name)
        return name if block is None else block_map[block] + name[len(block) :]

    return to_base


def _container(block: str) -> str:
    return block.rpartition(".")[0]
