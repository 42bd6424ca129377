"""MkDocs hook: tables made from what the code declares, never copied by hand.

- ``<!-- metrics-table -->``: every metric of ``kumo_listener._core.METRICS``
  (the table in ``rust/metrics.rs``), with its type, labels and help.
- ``<!-- e2e-results -->``: the performance page's tables, from the harness's JSON.

``docs/performance.md`` holds the marker line ``<!-- e2e-results -->``; at
build time it is replaced by the markdown that ``benches/e2e/report.py``
renders from the committed ``docs/performance/e2e.json``, so that the figures
are never copied by hand. A page with the marker and no report module, or no
JSON, fails the build: there is no fallback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = "<!-- e2e-results -->"
METRICS_MARKER = "<!-- metrics-table -->"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "performance" / "e2e.json"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if METRICS_MARKER in markdown:
        markdown = markdown.replace(METRICS_MARKER, _metrics_table())
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _e2e_results(page.file.src_path))
    return markdown


def _metrics_table() -> str:
    from kumo_listener._core import METRICS

    rows = ["| metric | type | labels | help |", "|---|---|---|---|"]
    for name, kind, help_text, labels in METRICS:
        shown = f"{name}_total" if kind == "counter" else name
        label_list = ", ".join(f"`{label}`" for label in labels)
        rows.append(f"| `{shown}` | {kind} | {label_list} | {help_text} |")
    return "\n".join(rows)


def _e2e_results(page: str) -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from benches.e2e.report import render_markdown
    except ImportError as error:
        raise PluginError(
            f"{page} has the marker {MARKER} but benches.e2e.report.render_markdown "
            f"cannot be imported ({error}): the tables are rendered from the harness's "
            f"JSON by that module"
        ) from error
    try:
        data = json.loads(RESULTS.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PluginError(f"{page}: cannot read the e2e results {RESULTS}: {error}") from error
    return render_markdown(data)
