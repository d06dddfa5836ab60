r"""The "what happens when ..." table of docs/TROUBLESHOOTING.md, for the tests that keep it true.

Each row of the table ends with an id in backticks; its "What you see" cell holds the message in
one or more code spans (``\|`` is a ``|``, as Markdown tables need it), where "…" stands for a
value that differs from run to run (a path, a number). A test that provokes the case calls
``assert_documented(id, text)`` on the message it got, so a message cannot change without its
row changing too.
"""

import os
import re
from typing import Dict, List

from tiny_models import REPO

DOC = os.path.join(REPO, "docs", "TROUBLESHOOTING.md")


def documented_messages() -> Dict[str, List[str]]:
    """Row id -> the code spans of its "What you see" cell."""
    rows = {}
    for line in open(DOC, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) < 3 or not re.fullmatch(r"`[a-z0-9-]+`", cells[-1]):
            continue
        spans = re.findall(r"`([^`]+)`", cells[-2])
        rows[cells[-1].strip("`")] = [span.replace("\\|", "|") for span in spans]
    return rows


def _pattern(span: str) -> str:
    parts = [re.escape(" ".join(p.split())) for p in span.split("…")]
    return ".*?".join(parts)


def assert_documented(row_id: str, text: str) -> None:
    """Every message of row ``row_id`` appears in ``text`` ("…" matching anything)."""
    spans = documented_messages()[row_id]
    assert spans, f"row {row_id!r} of {DOC} documents no message"  # nothing to see: no call
    flat = " ".join(text.split())
    for span in spans:
        assert re.search(
            _pattern(span), flat, re.DOTALL
        ), f"{DOC}, row {row_id!r}: the documented message\n  {span}\nis not in\n  {flat[-3000:]}"
