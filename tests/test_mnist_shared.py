"""The MNIST loader on the real files: the offline copy of the standard distribution beside the project."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

# The official test-set label counts, digits 0..9.
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no offline MNIST copy at {SHARED_MNIST.name}/ beside the project")
    return SHARED_MNIST


def test_the_standard_files_load_with_their_official_shapes_and_counts(mnist_dir: Path) -> None:
    pytest.importorskip("numpy", reason="the experiments extra (numpy) is not installed")
    import torch

    from aon_func._experiments.data import load_dataset

    data = load_dataset("mnist", mnist_dir)
    assert tuple(data.x_train.shape) == (60_000, 1, 28, 28)
    assert tuple(data.x_test.shape) == (10_000, 1, 28, 28)
    assert data.n_classes == 10
    assert torch.bincount(data.y_test, minlength=10).tolist() == TEST_COUNTS
    assert data.x_train.dtype == torch.float32
    # standardised by the training set
    assert float(data.x_train.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(data.x_train.std()) == pytest.approx(1.0, abs=1e-2)


def test_the_copy_is_the_documented_one(mnist_dir: Path) -> None:
    lines = (mnist_dir / "README.md").read_text(encoding="utf-8").splitlines()
    sums = {
        ln.split()[1]: ln.split()[0]
        for ln in lines
        if len(ln.split()) == 2 and len(ln.split()[0]) == 64
    }
    assert len(sums) == 4
    for name, digest in sums.items():
        assert hashlib.sha256((mnist_dir / name).read_bytes()).hexdigest() == digest


def test_a_subsample_of_mnist_trains_with_its_split(mnist_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("numpy", reason="the experiments extra (numpy) is not installed")
    import json

    from aon_func._cli import main

    argv = [
        "train",
        "--method",
        "plain",
        "--dataset",
        "mnist",
        "--data-dir",
        str(mnist_dir),
        "--model",
        "mlp",
        "--train-size",
        "1000",
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--quiet",
    ]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["split"] == {"train": 900, "val": 100, "test": 10_000}
    run = res["methods"]["plain"]["runs"][0]
    assert run["test_acc"] > 0.5  # 9 batches of real digits already beat chance (0.1) by far
