"""Shared test configuration: the ``device`` fixture and the hypothesis profiles.

Hypothesis profiles, chosen by the ``HYPOTHESIS_PROFILE`` environment variable:

- ``ci`` (the default): 200 examples per property, derandomised so that a run
  is reproducible, no deadline (the first call of a kernel is slow).
- ``thorough``: 5,000 examples per property with a fresh random seed, run by
  hand: ``HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_kernel_properties.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_NO_CUDA = "CUDA is not available (torch.cuda.is_available() is False): the CPU run covers it"


def _device_params() -> list[object]:
    cuda_marks = () if torch.cuda.is_available() else (pytest.mark.skip(reason=_NO_CUDA),)
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=cuda_marks)]


@pytest.fixture(scope="session", params=_device_params())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every test that takes ``device`` runs on the CPU, and on CUDA whenever torch sees one.

    Without CUDA the ``cuda`` case is skipped with its reason, which ``-ra``
    prints in the summary: never silently.
    """
    return torch.device(request.param)


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command generates or reads any data (a mistake must cost none)."""
    from aon_func._experiments import data

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the command loaded data before reporting the mistake")

    monkeypatch.setattr(data, "load_dataset", refuse)
