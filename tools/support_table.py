"""The support table (docs/support.md), generated from the tests' ``covers`` markers so it cannot claim more than they check.

A test says what it covers with ``@pytest.mark.covers(feature, check)`` (registered in
tests/conftest.py): ``feature`` is a row (a pipeline, a scheduler, a call option), ``check`` a
column (one of ``CHECKS``). A mark may name only the feature or only the check (for instance on a
fixture's params); each test then covers every feature times every check its marks name.
``xfail="why"`` shows the cell as a known failure, ``cuda_only=True`` as written but not run in CI.

    python tools/support_table.py           # print the table; exit 1 if docs/support.md differs
    python tools/support_table.py --write   # rewrite docs/support.md's table

Only collection runs (``pytest --collect-only`` in-process): no test executes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "support.md"
BEGIN, END = "<!-- support-table:begin -->", "<!-- support-table:end -->"
COMMAND = "python tools/support_table.py --write"

# The columns, in order; a mark naming another check is an error (a typo would add a column).
CHECKS = (
    "caching off = plain",
    "= DeepCache",
    "compiled (dynamo, no graph breaks)",
    "emulated CUDA Graphs",
    "CUDA Graphs",
)
PASSED, CUDA_ONLY, XFAIL = "✓", "CUDA only", "xfail"  # a cell shows the best status of its tests
RANK = {PASSED: 0, CUDA_ONLY: 1, XFAIL: 2}


@dataclass(frozen=True)
class Covered:
    """One collected test's claim: it checks ``check`` for ``feature`` with this status."""

    feature: str
    check: str
    status: str
    nodeid: str
    note: str = ""  # why, for an xfail


class _Collector:
    """pytest plugin that keeps the collected items."""

    def __init__(self) -> None:
        self.items: list[pytest.Item] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = list(session.items)


def collect(tests: Path = ROOT / "tests") -> list[Covered]:
    """Collects the tests (nothing runs) and returns every (feature, check) cell each one covers."""
    collector = _Collector()
    output = io.StringIO()
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "--capture=no",
            "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(tests)]
    with contextlib.redirect_stdout(output):
        code = pytest.main(args, plugins=[collector])
    if code != pytest.ExitCode.OK:
        raise RuntimeError(f"collecting {tests} failed (pytest exit code {code}):\n{output.getvalue()[-3000:]}")
    return [covered for item in collector.items for covered in _cells(item)]


def _cells(item: pytest.Item) -> list[Covered]:
    marks = list(item.iter_markers("covers"))
    features: list[str] = []
    checks: list[str] = []
    for mark in marks:
        feature = mark.kwargs.get("feature", mark.args[0] if mark.args else None)
        check = mark.kwargs.get("check", mark.args[1] if len(mark.args) > 1 else None)
        unknown = set(mark.kwargs) - {"feature", "check", "xfail", "cuda_only"}
        if unknown or len(mark.args) > 2 or (check is not None and check not in CHECKS):
            raise ValueError(f"{item.nodeid}: bad covers mark {mark}; checks are {CHECKS}")
        if feature is not None and feature not in features:
            features.append(feature)
        if check is not None and check not in checks:
            checks.append(check)
    status, note = PASSED, ""
    xfail = item.get_closest_marker("xfail")
    reasons = [mark.kwargs["xfail"] for mark in marks if mark.kwargs.get("xfail")]
    if xfail or reasons:
        status, note = XFAIL, (reasons[0] if reasons else xfail.kwargs.get("reason", ""))
    elif any(mark.kwargs.get("cuda_only") for mark in marks):
        status = CUDA_ONLY
    skipped = item.get_closest_marker("skip") or item.get_closest_marker("skipif")
    if marks and skipped and status != CUDA_ONLY:
        raise ValueError(f"{item.nodeid}: a skipped test must say covers(..., cuda_only=True), not claim a CI pass")
    return [Covered(f, c, status, item.nodeid, note) for f in features for c in checks]


def _row_order(feature: str) -> tuple[int, str]:
    """Pipelines, then schedulers, then everything else (call options), each alphabetically."""
    group = 0 if "Pipeline" in feature else 1 if "Scheduler" in feature else 2
    return group, feature.lower()


def render(cells: list[Covered]) -> str:
    """The Markdown between the markers: table, how it is made, and the tests behind each cell."""
    by_cell: dict[tuple[str, str], list[Covered]] = defaultdict(list)
    for cell in sorted(cells, key=lambda cell: cell.nodeid):  # not collection order: conftest reorders files
        by_cell[cell.feature, cell.check].append(cell)
    features = sorted({cell.feature for cell in cells}, key=_row_order)
    lines = ["| pipeline, scheduler or option | " + " | ".join(CHECKS) + " |", "|---" * (len(CHECKS) + 1) + "|"]
    for feature in features:
        statuses = [min((c.status for c in by_cell[feature, check]), key=RANK.__getitem__, default="")
                    for check in CHECKS]
        lines.append("| " + feature.replace("|", "\\|") + " | " + " | ".join(statuses) + " |")
    legend = (f"Generated by `{COMMAND}` from the tests' `@pytest.mark.covers(feature, check)` markers"
              " (tests/test_support_table.py fails when it is out of date). "
              f"{PASSED}: checked by a test on every CI run (CPU); {CUDA_ONLY}: the test needs a GPU and is"
              f" not run in CI; {XFAIL}: a known failure, not working; empty: no test. The tests behind each cell:")
    lines += [
        "",
        textwrap.fill(legend, width=100, break_long_words=False, break_on_hyphens=False),
        "",
        "<details><summary>test ids per row and check</summary>",
        "",
    ]
    for feature in features:
        lines.append(f"- {feature}")
        for check in CHECKS:
            if by_cell[feature, check]:
                lines.append(f"  - {check}: " + ", ".join(_grouped_ids(by_cell[feature, check])))
    lines += ["", "</details>"]
    return "\n".join(lines)


def _grouped_ids(cells: list[Covered]) -> list[str]:
    """``file::test[a, b]`` per test function and status, so a check stays one readable line."""
    params: dict[tuple[str, str], list[str]] = defaultdict(list)
    for cell in cells:
        base, _, param = cell.nodeid.removeprefix("tests/").partition("[")
        status = "" if cell.status == PASSED else f" ({cell.status}{': ' + cell.note if cell.note else ''})"
        params[base, status].append(param.removesuffix("]"))
    return [f"`{base}" + (f"[{', '.join(p)}]`" if any(p) else "`") + status for (base, status), p in params.items()]


def replace_section(text: str, table: str) -> str:
    """`text` with everything between the markers replaced by ``table``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{DOC.name} needs the markers {BEGIN} and {END} around the table")
    return text[: start + len(BEGIN)] + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/support.md's table instead of checking it")
    args = parser.parse_args(argv)
    table = render(collect())
    if not args.write:
        print(table)
    current = DOC.read_text()
    updated = replace_section(current, table)
    if args.write:
        DOC.write_text(updated)
    elif updated != current:
        print(f"\ndocs/support.md's support table is out of date: run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
