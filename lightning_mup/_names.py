"""Dotted module names and glob patterns over them (``*`` stays inside one name part, ``**`` crosses)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    table = {"**": ".*", "*": r"[^.]*", "?": r"[^.]"}
    return re.compile("".join(table.get(p, re.escape(p)) for p in parts) + r"\Z")


# Wrappers that insert a level into parameter and module names without changing the model:
# FSDP, activation checkpointing, torch.compile.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def unwrap_name(name: str) -> str:
    """The name a parameter or module had before FSDP / checkpointing / compile wrapped it."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def glob_match(pattern: str, name: str) -> bool:
    return _compile(pattern).match(name) is not None


def select(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """Names matching any pattern, in the order of ``names``."""
    patterns = list(patterns)
    return [n for n in names if any(glob_match(p, n) for p in patterns)]


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def nearest(name: str, candidates: Iterable[str], k: int = 8) -> list[str]:
    """Candidates sharing the longest prefix with ``name`` — for error messages."""
    import difflib

    return difflib.get_close_matches(name, list(candidates), n=k, cutoff=0.0)
