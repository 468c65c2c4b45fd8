"""Placeholder: ``aon-func bench`` is registered here (work in progress)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add ``bench`` to the ``aon-func`` parser (not yet)."""
