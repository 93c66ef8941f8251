"""Make nbval agree with nbdev: run what nbdev-test runs, skip what it skips.

nbdev-clean stores every cell with `execution_count: null`, which nbval reads as "never run" and
refuses when the cell carries outputs; cells with outputs get a count here instead. Cells marked
`#| eval: false` or with a tst_flags directive (`#| slow`), and notebooks whose first raw cell says
`skip_exec: true`, are skipped as nbdev-test skips them.
"""

import re
import tomllib
from pathlib import Path

import pytest

FLAGS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["nbdev"]["tst_flags"].split()
SKIP_CELL = re.compile(r"^#\|\s*(eval:\s*false|" + "|".join(map(re.escape, FLAGS)) + r")\s*$", re.M)


def _skip_notebook(nb) -> bool:
    first = nb.cells[0] if nb.cells else None
    return bool(first and first.cell_type == "raw" and re.search(r"skip_exec:\s*true", first.source))


def pytest_collection_modifyitems(config, items):
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None:
            continue
        if _skip_notebook(item.parent.nb) or SKIP_CELL.search(cell.source):
            item.add_marker(pytest.mark.skip(reason="skipped by nbdev directive"))
        elif cell.execution_count is None and cell.get("outputs"):
            cell.execution_count = 1
