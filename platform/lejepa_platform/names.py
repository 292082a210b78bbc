"""File-system- and MLflow-safe names made from user text (experiment names, run ids, paths)."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """`text` with every run of characters other than letters, digits, '_', '.' and '-' replaced by one '_'."""
    return _UNSAFE.sub("_", text)
