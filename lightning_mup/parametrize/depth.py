"""Residual blocks: where they are, which modules end their branches, and how deep the model is.

Depth scaling (h + m_L^-α · F(h)) multiplies each branch end's output; the depth multiplier is
m_L = L / L_base with L the number of residual blocks. A base built shallower than the model is
matched block by block (block i of a container ↔ base block i mod its count there), so base and delta
stay small in depth as well as width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_mup._names import glob_match, join, nearest
from lightning_mup.parametrize.adapters import block_branch_ends


@dataclass
class Blocks:
    names: list[str]  # residual block modules, in module order
    branch_ends: dict[str, list[str]]  # block name -> absolute names of the modules ending its branches

    @property
    def depth(self) -> int:
        return len(self.names)

    def block_of(self, name: str) -> str | None:
        for block in self.names:
            if name == block or name.startswith(block + "."):
                return block
        return None


def find_blocks(model: nn.Module, residual_blocks: Mapping[str, Sequence[str]] | None = None) -> Blocks:
    """Residual blocks from user patterns (``{"layers.*": ["fc2"]}``) or from the registered adapters."""
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
    return Blocks(names, ends)


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
