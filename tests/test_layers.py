"""Each layer imports only downward (np_agent/__init__.py draws the pipeline).

Read from the source with ``ast``, function-level imports included, so a shortcut taken inside
a function fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

# package (path prefix of a module) -> module prefixes it must never import
FORBIDDEN = {
    "np_agent.policy": ("np_agent.nft", "np_agent.node", "np_agent.run", "np_agent.cli",
                        "np_agent.dump", "np_lab"),
    "np_agent.ruleset": ("np_agent.policy", "np_agent.nft", "np_agent.node", "np_lab"),
    "np_agent.nft": ("np_agent.policy", "np_agent.node", "np_agent.run", "np_agent.cli",
                     "np_agent.dump", "np_lab"),
    "np_agent.node": ("np_agent.run", "np_agent.cli", "np_agent.dump", "np_lab"),
    "np_agent": ("np_lab",),
    "np_cni": ("np_agent", "np_lab"),
}
SOURCES = {"np_agent": ROOT / "agent" / "np_agent", "np_cni": ROOT / "cni" / "np_cni"}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out.append((".".join(parts), path))
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}: relative import; write it absolute so the layer shows")
    return found


def _rules_for(module: str) -> tuple[str, ...]:
    """The rules of the most specific package the module belongs to."""
    owners = [p for p in FORBIDDEN if module == p or module.startswith(p + ".")]
    return FORBIDDEN[max(owners, key=len)] if owners else ()


@pytest.mark.parametrize("module,path", _modules(), ids=lambda v: str(v).rsplit("/", 1)[-1])
def test_no_upward_import(module: str, path: Path) -> None:
    bad = sorted(imp for imp in _imports(path) for banned in _rules_for(module)
                 if imp == banned or imp.startswith(banned + "."))
    assert not bad, f"{module} imports {bad}: a layer imports only the ones below it"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an nft module importing the compiler is caught."""
    bad = tmp_path / "x.py"
    bad.write_text("from np_agent.policy.compiler import compile_state\n")
    found = _imports(bad)
    assert any(i.startswith(p) for i in found for p in _rules_for("np_agent.nft.x"))
    assert not any(i.startswith(p) for i in found for p in _rules_for("np_agent.node.x"))
