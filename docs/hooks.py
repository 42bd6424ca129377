"""MkDocs hook: the performance page's tables come from the harness's JSON.

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
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "performance" / "e2e.json"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, _e2e_results(page.file.src_path))


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
