"""The tree's one direction of imports (ARCHITECTURE.md): leaves ← world ← kron ← families ← formats ← pipeline ←
inference ← scoring ← training ← evaluation ← cli. A module may import its own layer and the layers below it, never one
above."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "krona_cli"
LAYERS = [
    *("leaves", "world", "kron", "families", "formats"),
    *("pipeline", "inference", "scoring", "training", "evaluation", "cli"),
]
LEAVES = {
    "choices",
    "late_imports",
    "errors",
    "atomic",
    "rng",
    "dtypes",
    "architectures",
    "lock",
    "outputs",
    "images",
    "lazy",
    "stopping",
    "__init__",
}


def layer_of(module: str) -> str:
    """`krona_cli.formats.lora` -> formats; top-level leaf modules -> leaves; cli -> cli."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in LEAVES:
        return "leaves"
    return "cli" if parts[0] == "__main__" else parts[0]


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every krona_cli import in a file, relative ones resolved, lazy ones included."""
    package = ["krona_cli", *path.relative_to(root).parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("krona_cli"):
                if node.module is None or target.count(".") == 0:  # `from . import x`: x is a module or a name
                    found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
                else:
                    found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("krona_cli")]
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        here = layer_of(".".join(("krona_cli", *rel.with_suffix("").parts)))
        for line, target in imports_of(path, root):
            there = layer_of(target)
            if there in LAYERS and LAYERS.index(there) > LAYERS.index(here):
                out.append(f"{rel}:{line} ({here}) imports {target} ({there})")
    return out


def test_no_module_imports_a_layer_above_it():
    assert violations() == []


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        assert layer_of(".".join(("krona_cli", *parts))) in LAYERS, path


def test_a_violating_import_is_caught(tmp_path):
    """The check itself: a kron module importing the pipeline is reported (so an empty list above means something)."""
    fake = tmp_path / "krona_cli"
    (fake / "kron").mkdir(parents=True)
    (fake / "kron" / "layer.py").write_text(
        "from ..pipeline.quantize import quantize\nfrom ..errors import KronaError\n"
    )
    (fake / "formats").mkdir()
    (fake / "formats" / "lora.py").write_text("def f():\n    from krona_cli.training.train import train\n")
    found = violations(fake)
    assert found == [
        "formats/lora.py:2 (formats) imports krona_cli.training.train (training)",
        "kron/layer.py:1 (kron) imports krona_cli.pipeline.quantize (pipeline)",
    ]


@pytest.mark.parametrize("leaf", sorted(LEAVES - {"__init__"}))
def test_leaves_import_only_leaves(leaf):
    assert all(layer_of(t) == "leaves" for _, t in imports_of(PACKAGE / f"{leaf}.py"))
