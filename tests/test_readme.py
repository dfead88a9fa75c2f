"""README tells the truth: its table of `trials` columns is the real schema, and it points nowhere outside the repo."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(name: str) -> str:
    """The text between `<!-- name -->` and `<!-- /name -->` in README.md."""
    text = README.read_text()
    return text.split(f"<!-- {name} -->", 1)[1].split(f"<!-- /{name} -->", 1)[0]


async def test_trials_columns_in_readme_are_the_schema(env):
    documented = [c for row in readme_block("trials-columns").splitlines()[3:] if row.startswith("| `")
                  for c in re.findall(r"`([a-z_]+)`", row.split("|")[1])]
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
