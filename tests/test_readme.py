"""README tells the truth: its table of `trials` columns is the real schema, every test it names as the proof of a
guarantee exists, and it points nowhere outside the repo."""

from __future__ import annotations

import ast
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(name: str) -> str:
    """The text between `<!-- name -->` and `<!-- /name -->` in README.md."""
    text = README.read_text()
    return text.split(f"<!-- {name} -->", 1)[1].split(f"<!-- /{name} -->", 1)[0]


async def test_trials_columns_in_readme_are_the_schema(env):
    documented = [c for row in readme_block("trials-columns").splitlines()[3:] if row.startswith("| `")
                  for c in re.findall(r"`([a-z_0-9]+)`", row.split("|")[1])]
    actual = [r["column_name"] for r in await env.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'trials' AND table_schema = "
        "current_schema() ORDER BY ordinal_position")]
    assert documented == actual


def test_readme_points_nowhere_outside_the_repository():
    text = README.read_text()
    assert "../" not in text  # no relative path leaving the clone
    for target in re.findall(r"\]\(([^)#]+)", text):
        if not target.startswith("http"):
            assert (README.parent / target).exists(), target


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return defined | assigned


def test_every_test_readme_and_docs_name_exists():
    """`tests/test_x.py::test_y` names a test (or a module-level name); a bare `::test_z` after it names one in the
    same file."""
    root = README.parent
    missing = []
    for document in (README, *sorted((root / "docs").glob("*.md"))):
        current = None
        for match in re.finditer(r"([\w/]+\.py)|::(\w+)", document.read_text()):
            if match.group(1):
                current = root / match.group(1) if match.group(1).startswith("tests/") else None
                if current is not None and not current.exists():
                    missing.append(f"{document.name}: {match.group(1)}")
            elif current is not None and current.exists() and match.group(2) not in _defined_names(current):
                missing.append(f"{document.name}: {current.relative_to(root)}::{match.group(2)}")
    assert not missing, missing
