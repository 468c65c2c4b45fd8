"""Every ```python block of docs/usage.md runs, each on its own."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

USAGE = Path(__file__).resolve().parent.parent / "docs" / "usage.md"


def _blocks() -> list[tuple[str, str]]:
    """``(id, code)`` per block, the id from the section heading above it."""
    text = USAGE.read_text(encoding="utf-8")
    out: list[tuple[str, str]] = []
    section, count = "top", 0
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", text, re.M | re.S):
        if match.group(1):
            section, count = match.group(1).strip(), 0
            continue
        count += 1
        slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
        out.append((f"{slug}-{count}", match.group(2)))
    return out


BLOCKS = _blocks()


def test_the_page_has_the_use_cases() -> None:
    ids = " ".join(i for i, _ in BLOCKS)
    for section in (
        "functional-training",
        "torch-optim",
        "maml",
        "ensembles",
        "torch-compile",
        "layers-beyond-torch-nn",
        "hugging-face-transformers",
        "aon-norm",
        "distributed-training",
    ):
        assert section in ids
    assert "parametrize" in ids


def test_the_first_example_is_the_recommended_setup() -> None:
    """Classifier left out, learnable gains: what docs/results.md measures best."""
    first = BLOCKS[0][1]
    assert 'exclude=["2.weight"]' in first
    assert "add_gains(params, init=2**0.5)" in first


SCRIPT_TIMEOUT_S = 300
"""A block written as a script (it starts processes) runs in a process of its own, bounded."""


def _is_script(code: str) -> bool:
    return 'if __name__ == "__main__":' in code


def _param(block_id: str, code: str) -> object:
    # compiling takes 5 s warm and 25 s with a cold compile cache on 2 CPU cores;
    # a script spawns processes (a few seconds each)
    slow = "torch.compile(" in code or _is_script(code)
    return pytest.param(code, id=block_id, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented"
)
@pytest.mark.parametrize("code", [_param(i, c) for i, c in BLOCKS])
def test_usage_block_runs(code: str, tmp_path: Path) -> None:
    if _is_script(code):
        script = tmp_path / "block.py"
        script.write_text(code, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(USAGE), "exec"), {"__name__": "__docs__"})
