"""The data readers of ``aon-func compare/train`` on tiny fake files, and their one-line errors."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aon_func._cli import main
from aon_func._experiments.data import (
    DataError,
    load_dataset,
    read_cifar10,
    read_idx,
)
from aon_func._experiments.models import DATASET_SHAPES

ROOT = Path(__file__).resolve().parents[1]


def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(
    folder: Path, *, n_train: int = 12, n_test: int = 6, size: int = 8, gz: bool = False
) -> dict[str, np.ndarray]:
    """A valid tiny MNIST in the idx format (images ``size x size``)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        raw = _idx_bytes(a)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def write_cifar(folder: Path, *, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A valid tiny CIFAR-10 python distribution (``cifar-10-batches-py``)."""
    rng = np.random.default_rng(1)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with (d / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x}, f, protocol=2)
        xs.append(x)
        ys.append(np.asarray(y))
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    np.testing.assert_array_equal(
        read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))),
        arrays["train-images-idx3-ubyte"],
    )
    ds = load_dataset("mnist", tmp_path)
    assert ds.x_train.shape == (12, 1, 8, 8)
    assert ds.x_test.shape == (6, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    assert abs(float(ds.x_train.mean())) < 1e-5  # standardised by the train set


def test_idx_int32_and_torchvision_layout(tmp_path: Path) -> None:
    a = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(_idx_bytes(a))
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), a)
    write_mnist(tmp_path / "MNIST" / "raw")
    assert load_dataset("mnist", tmp_path).x_train.shape[0] == 12


def test_mnist_malformed(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)
    with pytest.raises(DataError, match=r"truncated header|truncated or malformed"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="bad magic"):
        load_dataset("mnist", tmp_path)
    raw = _idx_bytes(np.zeros((6, 8, 8), dtype=np.uint8))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated or malformed"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        _idx_bytes(np.zeros((5, 8, 8), dtype=np.uint8))
    )
    with pytest.raises(DataError, match="do not match"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(gzip.compress(raw)[:20])
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("mnist", tmp_path)


def test_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", None)


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar_reader_round_trip(tmp_path: Path) -> None:
    x, y = write_cifar(tmp_path)
    x_tr, y_tr, x_te, y_te = read_cifar10(tmp_path)
    np.testing.assert_array_equal(x_tr.reshape(-1, 3072), x[:20])
    np.testing.assert_array_equal(y_tr, y[:20])
    np.testing.assert_array_equal(x_te.reshape(-1, 3072), x[20:])
    np.testing.assert_array_equal(y_te, y[20:])
    ds = load_dataset("cifar10", tmp_path / "cifar-10-batches-py")  # the folder itself works too
    assert ds.x_train.shape == (20, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32)


def test_cifar_malformed(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(b"garbage, not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_dataset("cifar10", tmp_path)
    with batch.open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="malformed"):
        load_dataset("cifar10", tmp_path)
    with batch.open("wb") as f:
        pickle.dump({b"nothing": 1}, f)
    with pytest.raises(DataError, match="no data/labels"):
        load_dataset("cifar10", tmp_path)
    # a pickle that would run code is refused, not executed
    with batch.open("wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_dataset("cifar10", tmp_path)
    batch.unlink()
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must not run",))


# --------------------------------------------------------------------------- generated data


def test_mnist1d_offline_and_keeps_global_rngs() -> None:
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002 (the legacy global RNG is what mnist1d touches)
    before = (random.random(), np.random.rand())  # noqa: NPY002
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    ds = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == before  # noqa: NPY002
    assert ds.x_train.shape == (4000, 40)
    assert ds.x_test.shape == (1000, 40)
    assert ds.input_shape == DATASET_SHAPES["mnist1d"]  # what --model is checked against
    assert set(ds.y_train.unique().tolist()) == set(range(10))
    assert torch.equal(load_dataset("mnist1d").x_train, ds.x_train)


def test_digits() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8)
    assert ds.x_test.shape == (360, 1, 8, 8)
    assert ds.input_shape == DATASET_SHAPES["digits"]
    assert 0.0 <= float(ds.x_train.min()) <= float(ds.x_train.max()) <= 1.0


# --------------------------------------------------------------------------- through the CLI


def test_cli_trains_on_fake_mnist_and_cifar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mnist(tmp_path / "mnist", gz=True)
    rc = main(
        [
            "train",
            "--method",
            "aon-2",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path / "mnist"),
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "o1"),
            "--quiet",
        ]
    )
    assert rc == 0
    write_cifar(tmp_path / "cifar", per_batch=2)
    rc = main(
        [
            "train",
            "--method",
            "sn",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "cifar"),
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "o2"),
            "--quiet",
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    assert (tmp_path / "o2" / "results.json").is_file()
    assert "resnet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "mnist"], "give --data-dir"),
        (["--dataset", "mnist", "--data-dir", "{tmp}/missing"], "is not a folder"),
        (["--dataset", "mnist", "--data-dir", "{tmp}/bad"], "bad magic"),
        (["--dataset", "cifar10", "--data-dir", "{tmp}"], "not found"),
    ],
)
def test_cli_data_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    write_mnist(tmp_path / "bad")
    (tmp_path / "bad" / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(["compare", *args, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1
    assert err.startswith("aon-func: error: ")
    assert not (tmp_path / "out").exists()


def test_cli_data_error_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aon_func",
            "compare",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "CIFAR-10" in proc.stderr
    assert proc.stdout == ""
