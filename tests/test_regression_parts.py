"""``scripts/regression_parts.py``: its replacements change what they claim, and are undone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import aon_func
import aon_func._kernel as kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import regression_parts


def _run() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(16, generator=g, dtype=torch.float64)
    return aon_func.aon(w, u, order=2)


def test_replacements_change_the_kernel_and_are_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    plain = regression_parts._plain_scaled_mm

    def counted(p: torch.Tensor, s: torch.Tensor, z: torch.Tensor, forward: bool) -> torch.Tensor:
        calls.append(p.shape)
        return plain(p, s, z, forward)

    monkeypatch.setattr(regression_parts, "_plain_scaled_mm", counted)
    saved = (kernel.gram_iterations, kernel._scaled_mm)
    h, u = _run()
    with regression_parts._replaced(("iterations",)):
        assert kernel.gram_iterations(1) == 1
        _, u1 = _run()
    assert (kernel.gram_iterations, kernel._scaled_mm) == saved
    assert not torch.allclose(u1, u)  # one Gram iteration instead of twelve
    with regression_parts._replaced(("product",)):
        h2, u2 = _run()
    assert (kernel.gram_iterations, kernel._scaled_mm) == saved
    torch.testing.assert_close(h2, h)  # the same values, by plain autograd
    assert calls == [(16, 16)]
    torch.testing.assert_close(u2, u)
