"""The walls of DESIGN.md, read from the source: which project package each module imports (ast, no import run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "common", "producer", "consumers", "gateway", "sntrack")
# What each library may import besides itself. gateway.client is the notebook client: it reuses the producer's
# event builder (producer.emitter) so a notebook reports trials exactly as the worker does.
ALLOWED = {
    "schemas": set(),
    "common": set(),
    "producer": {"schemas", "common"},
    "consumers": {"schemas", "common"},
    "gateway": {"schemas", "common", "producer.emitter"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included), as dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def project_imports(package: str) -> dict[str, set[str]]:
    """For each module of `package`, the modules of other project packages it imports."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        others = {m for m in imported_modules(path) if m.split(".")[0] in PACKAGES and m.split(".")[0] != package}
        found[str(path.relative_to(ROOT))] = others
    return found


def crosses(module: str, allowed: set[str]) -> bool:
    return not any(module == a or module.startswith(f"{a}.") for a in allowed)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_library_imports_only_what_its_wall_allows(package):
    found = project_imports(package)
    assert found, f"no modules found under {package}/"
    breaches = {path: sorted(m for m in mods if crosses(m, ALLOWED[package])) for path, mods in found.items()}
    assert {path: mods for path, mods in breaches.items() if mods} == {}


def test_the_check_sees_a_breach(tmp_path):
    """The parser finds a function-level import of sntrack, so a pass above means the walls hold."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sntrack.settings import Settings\n    import consumers.runtime\n")
    assert imported_modules(module) == {"sntrack.settings", "consumers.runtime"}
    assert crosses("sntrack.settings", ALLOWED["producer"])
    assert crosses("producer.publisher", ALLOWED["gateway"]) and not crosses("producer.emitter", ALLOWED["gateway"])


def test_the_shell_imports_every_library():
    imported = {m.split(".")[0] for mods in project_imports("sntrack").values() for m in mods}
    assert imported >= set(ALLOWED)
