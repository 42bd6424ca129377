"""Loading parameter files: ``kumo.serde.toml_load`` and ``json_load``."""

from __future__ import annotations

import json
import os
import tomllib
from typing import Any


def toml_load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file into a dict."""
    with open(path, "rb") as file:
        return tomllib.load(file)


def json_load(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file."""
    with open(path, encoding="utf-8") as file:
        return json.load(file)
