"""Placeholder: the experiments' sub-commands are registered here (work in progress)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add ``compare`` and ``train`` to the ``aon-func`` parser (not yet)."""
    _ = argparse
