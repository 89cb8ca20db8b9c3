"""The package layers the README draws: base <- edge <- {mcu, tee} <- tools. An import against them (at
module level or inside a function) fails here, naming the file and line."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("base", "edge", "mcu", "tee", "tools", "tinyshield")
MAY_IMPORT = {
    "base": {"base"},
    "edge": {"base", "edge"},
    "mcu": {"base", "edge", "mcu"},
    "tee": {"base", "edge", "tee"},
    "tinyshield": {"base", "edge", "mcu", "tinyshield"},
    "tools": set(PACKAGES),
}


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name.split(".")[0], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_below_it(package):
    wrong = [f"{f.relative_to(ROOT)}:{line} imports {top}"
             for f in sorted((ROOT / package).rglob("*.py"))
             for top, line in imports(f) if top in PACKAGES and top not in MAY_IMPORT[package]]
    assert not wrong, "\n".join(wrong)
