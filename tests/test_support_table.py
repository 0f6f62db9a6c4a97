"""docs/support.md's support table is what the tests' ``covers`` markers say (collection only: seconds, nothing runs)."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "tools" / "support_table.py"
if "support_table" not in sys.modules:  # tools/ is not a package: load the script as a module once
    _spec = importlib.util.spec_from_file_location("support_table", _PATH)
    sys.modules["support_table"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["support_table"])
support_table = sys.modules["support_table"]


def test_support_table_is_up_to_date():
    current = support_table.DOC.read_text()
    expected = support_table.replace_section(current, support_table.render(support_table.collect()))
    if expected != current:
        diff = "\n".join(difflib.unified_diff(current.splitlines(), expected.splitlines(), "docs/support.md", "generated",
                                             lineterm=""))
        pytest.fail(f"docs/support.md's support table is out of date with the tests' covers markers.\n"
                    f"Run `{support_table.COMMAND}` and commit docs/support.md.\n{diff}", pytrace=False)
