"""The 100-line rule: no function or method in krona_cli/ is longer than 100 lines (decorators and signature
included), so that every command and every step reads on one screen."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "krona_cli"
LIMIT = 100


def long_functions(root: Path = PACKAGE, limit: int = LIMIT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > limit:
                    found.append(f"{path.relative_to(root)}:{start} {node.name} ({node.end_lineno - start + 1} lines)")
    return found


def test_no_function_is_over_100_lines():
    assert long_functions() == []


def test_a_long_function_is_caught(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    (tmp_path / "long.py").write_text(f"@decorated\ndef long():\n{body}\n\ndef short():\n    return 1\n")
    assert long_functions(tmp_path) == [f"long.py:1 long ({LIMIT + 2} lines)"]
