"""The tree's one direction of imports (ARCHITECTURE.md): leaves ← world ← kron ← families ← formats ← pipeline ←
inference ← scoring ← training ← evaluation ← cli. A module may import its own layer and the layers below it, never one
above."""

import ast
import re
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
    "paths",
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


# A model family is its own files: no line of krona_cli outside the files named for a family (`*NAME*.py`: its module,
# its tiny pipeline, its single-file layout) names it, but for its row in the registry. Help texts and messages list
# the registry's families instead. The words that name each family held to this: its registry name, titles, hub ids
# and diffusers' class names. The families before them (SDXL, SD 1.x/2.x, FLUX.1) are not held to it yet.
NAMED = {
    "sd3": r"(?<![a-z0-9])sd ?3(?!\d)|stable[-_ ]?diffusion[-_ ]?3",
    "flux2": r"flux[-_.]?2|klein",
    "qwen_image": r"qwen[-_ ]?image",
    "z_image": r"(?<![a-z])z[-_ ]?image",
}
NOT_YET = {"sdxl", "sd15", "sd2", "flux"}
REGISTRY = "families/__init__.py"
REGISTRY_ROW = re.compile(r"^from \.\w+ import \w+$|^FAMILIES: ")


def family_names(root: Path = PACKAGE) -> list[str]:
    """`file:line names FAMILY` for each line outside a family's own files that names it."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if rel == REGISTRY and REGISTRY_ROW.match(line):
                continue
            found += [
                f"{rel}:{number} names {family}"
                for family, words in NAMED.items()
                if family not in path.stem and re.search(words, line, re.IGNORECASE)
            ]
    return found


def test_no_line_outside_a_familys_own_files_names_it():
    assert family_names() == []


def test_every_new_family_is_held_to_its_own_files():
    from krona_cli.families import FAMILIES

    assert {f.name.replace("-", "_") for f in FAMILIES} - NOT_YET == NAMED.keys()
    for family in NAMED:
        assert len((PACKAGE / "families" / f"{family}.py").read_text().splitlines()) < 300, family


def test_a_line_naming_a_family_elsewhere_is_caught(tmp_path):
    """The check itself: a shared module's class name, comment and help text, another family's file and a registry
    line beyond the rows are reported; the family's own files and its row are not."""
    fake = tmp_path / "krona_cli"
    for folder in ("formats", "pipeline", "families", "cli"):
        (fake / folder).mkdir(parents=True)
    (fake / "formats" / "naming.py").write_text("x = 1\nuse('SD3Transformer2DModel')\n# as Qwen-Image does\n")
    (fake / "cli" / "sample.py").write_text('HELP = "50 steps for FLUX.2 [klein] bases"\n')
    (fake / "pipeline" / "tiny_z_image.py").write_text("from diffusers import ZImagePipeline\n# like sd3.5\n")
    (fake / "formats" / "sd3_layout.py").write_text("# Stability's SD3 layout: StableDiffusion3Pipeline\n")
    (fake / "families" / "__init__.py").write_text(
        "from .flux2 import FLUX2\nFAMILIES: tuple = (FLUX2,)\nif name == 'flux2':\n    pass\n"
    )
    assert family_names(fake) == [
        "cli/sample.py:1 names flux2",
        "families/__init__.py:3 names flux2",
        "formats/naming.py:2 names sd3",
        "formats/naming.py:3 names qwen_image",
        "pipeline/tiny_z_image.py:2 names sd3",
    ]
