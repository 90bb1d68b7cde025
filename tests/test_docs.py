"""README's figures are BENCHMARKS.md's: each block README marks as measured is the same text in both files."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("pathfinder-cls", "pathfinder-seg")


def _block(path: Path, name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", path.read_text(), re.S)
    assert match, f"{path.name} has no {name} block"
    return match.group(1)


@pytest.mark.parametrize("name", SHARED)
def test_readmes_measured_tables_are_benchmarks_tables(name):
    readme, benchmarks = _block(ROOT / "README.md", name), _block(ROOT / "BENCHMARKS.md", name)
    assert benchmarks.strip(), f"BENCHMARKS.md's {name} block is empty"
    assert readme == benchmarks, f"README's {name} table differs from BENCHMARKS.md's: copy it from there"
