"""The layers of ../shared/DESIGN.md, checked on the source: every import of a lightning_mup module (also one
inside a function) points down or sideways, never up; the pure-torch layers never import Lightning; the report
never imports a command. A new module gets a layer here or the test names it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lightning_mup"

# lowest first; a module may import its own layer and any below
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("_run_folder", "_names", "_help", "_rng", "_untouched", "_autocorrelation")),
    ("theory", ("theory",)),
    ("model families", ("families",)),
    ("parametrize", ("parametrize",)),
    ("measure", ("measure",)),
    ("lightning glue", ("strategy", "_hparams", "_progress", "callbacks", "models", "data")),
    ("report", ("report",)),
    ("recipes", ("recipe",)),
    ("commands", ("sweep", "sweep_launch", "sweep_state", "limit")),
    ("cli", ("cli",)),
]
PURE_TORCH = (
    "_run_folder",
    "_names",
    "_help",
    "_rng",
    "_untouched",
    "_autocorrelation",
    "theory",
    "families",
    "parametrize",
    "measure",
    "report",
)


def _layer(module: str) -> int:
    """The layer of ``lightning_mup.<module>`` (dotted, package-relative)."""
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise KeyError(module)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported lightning_mup module or 'lightning', line) for every import statement in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                name = ".".join([*base, node.module] if node.module else base)
                found.append(("lightning_mup." + name if name else "lightning_mup", node.lineno))
            elif node.module:
                found.append((node.module, node.lineno))
                if node.module == "lightning_mup":  # from lightning_mup import strategy: a module, maybe
                    found += [(f"lightning_mup.{a.name}", node.lineno) for a in node.names]
    return found


def _own(name: str, modules: dict[str, Path]) -> str | None:
    if not name.startswith("lightning_mup."):
        return None
    parts = name.removeprefix("lightning_mup.").split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def test_every_module_has_a_layer():
    unplaced = []
    for module in _modules():
        try:
            _layer(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"give these a layer in LAYERS (see ../shared/DESIGN.md): {unplaced}"


def test_imports_point_down():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        for name, line in _imports(module, path):
            target = _own(name, modules)
            if target is not None and _layer(target) > _layer(module):
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} {module} ({LAYERS[_layer(module)][0]}) imports "
                    f"{target} ({LAYERS[_layer(target)][0]})"
                )
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("layer", PURE_TORCH)
def test_the_pure_layers_never_import_lightning(layer):
    modules = _modules()
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for module, path in modules.items()
        if module == layer or module.startswith(layer + ".")
        for name, line in _imports(module, path)
        if name == "lightning" or name.startswith(("lightning.", "pytorch_lightning"))
    ]
    assert not found, "\n".join(found)


def test_the_checker_sees_an_upward_import(tmp_path):
    # the test above would pass on a parser that finds nothing: a planted upward import must be found
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from lightning_mup.cli import main\n")
    assert ("lightning_mup.cli", 2) in _imports("parametrize.planted", planted)
    assert _layer("parametrize.core") < _layer("cli")


def test_the_family_registry_imports_no_model_library():
    # families/ matches types by qualified name: importing timm or transformers there would make them required
    modules = _modules()
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for module, path in modules.items()
        if module.startswith("families")
        for name, line in _imports(module, path)
        if name.split(".")[0] in ("timm", "transformers")
    ]
    assert not found, "\n".join(found)
