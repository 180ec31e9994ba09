"""Dependencies point one way: the core never imports a model family (STYLE.md §1, #16).

A family (TransformerLens, Hugging Face) is found by the model's type
(``degen_hooks._family``); a new family is one new module in ``degen_hooks/families``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "degen_hooks"
FAMILY_MODULES = ("transformer_lens", "transformers", "families")
# Leaves may import families: they load models (zoo), analyse them (modadd) or run commands.
LEAVES = {"zoo.py", "modadd.py", "cli.py", "__main__.py", "plotting.py"}


def core_modules() -> list[Path]:
    skip = {PACKAGE / "transformer_lens", PACKAGE / "families"}
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if not any(parent in skip for parent in path.parents) and path.name not in LEAVES
    ]


def family_imports(path: Path) -> list[str]:
    """Imports of a family anywhere in the module, function-level (lazy) ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
            if node.level and not node.module:  # from . import x
                names = [alias.name for alias in node.names]
        else:
            continue
        found += [
            n
            for n in names
            if n.split(".")[-1] in FAMILY_MODULES or n.split(".")[0] in FAMILY_MODULES
        ]
    return found


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_imports_no_family(path):
    assert family_imports(path) == []


def test_importing_the_package_imports_no_family():
    code = (
        "import sys, degen_hooks, degen_hooks.graph\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'transformers')"
        " or m.startswith(('degen_hooks.transformer_lens', 'degen_hooks.families'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "[]"
