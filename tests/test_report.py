"""The plots of a results folder and ``aon-func report DIR [--out OUT]``.

Every test builds a synthetic ``results.json`` in its own folder (no training,
no data): a few methods with five runs each, histories with per-layer ``cond``
and ``grad_norm`` and some values that are not finite (NaN, inf, ``None``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from aon_func._cli import main
from aon_func._experiments import cli as experiments_cli
from aon_func._experiments import stats
from aon_func._experiments.report import (
    PLOTS,
    layer_band,
    mean_curve,
    speed_point,
    steps_per_epoch,
    write_plots,
    write_results,
)

METHODS = {"plain": "plain", "soft": "soft orth. lambda=0.001", "aon-1": "AON K=1"}
SEEDS = 5
EPOCHS = 4
LAYERS = ("fc1.weight", "fc2.weight", "fc3.weight")


@pytest.fixture(autouse=True)
def _agg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _run(method: str, k: int, seed: int) -> dict[str, Any]:
    """One run of method number ``k``: made-up numbers that differ per method, seed and layer."""
    history = []
    for e in range(1, EPOCHS + 1):
        history.append(
            {
                "epoch": e,
                "train_loss": 2.0 / (e + k) + 0.01 * seed,
                "val_acc": 0.5 + 0.05 * e + 0.01 * k,
                "val_loss": 1.0 / e,
                "seconds": 0.1 * (k + 1),
                "grad_norm": {n: 0.1 * (j + 1) * e for j, n in enumerate(LAYERS)},
                "cond": {n: 1.0 + 10.0 * (j + 1) * (k + 1) for j, n in enumerate(LAYERS)},
            }
        )
    return {
        "method": method,
        "label": METHODS[method],
        "seed": seed,
        "config": {"method": method, "lr": 0.01, "normalise_head": False, "gain": "learnable"},
        "val_acc": history[-1]["val_acc"],
        "test_acc": 0.6 + 0.05 * k + 0.01 * seed,
        "train_loss": history[-1]["train_loss"],
        "test_loss": 1.0,
        "stopped_epoch": EPOCHS,
        "ortho_error": 0.1 * k,
        "ortho_error_per_layer": dict.fromkeys(LAYERS, 0.1 * k),
        "sec_per_epoch": 0.1 * (k + 1),
        "probe_layer": "fc2.weight",
        "spectrum": [3.0, 2.0, 1.0 + k, 0.5],
        "gains": {},
        "history": history,
        "checkpoint": f"runs/{method}/seed{seed}.pt",
    }


def _payload() -> dict[str, Any]:
    """A ``results.json`` as ``aon-func compare`` writes it (without ``summary``)."""
    methods: dict[str, Any] = {}
    for k, (name, label) in enumerate(METHODS.items()):
        runs = [_run(name, k, s) for s in range(SEEDS)]
        accs = [r["test_acc"] for r in runs]
        methods[name] = {
            "label": label,
            "selected": {
                "method": name,
                "lr": 0.01,
                "normalise_head": False,
                "gain": "learnable",
                "gain_init": math.sqrt(2),
                "val_acc": 0.7,
            },
            "grid": [],
            "runs": runs,
            "test_acc_mean": sum(accs) / len(accs),
            "test_acc_ci95": list(stats.bca_interval(accs, resamples=200)),
        }
    # what the plots must skip: NaN, inf and None (a singular layer)
    h = methods["soft"]["runs"][1]["history"]
    h[2]["cond"]["fc1.weight"] = math.nan
    h[3]["cond"]["fc2.weight"] = None
    h[1]["grad_norm"]["fc3.weight"] = math.inf
    h[0]["train_loss"] = math.nan
    methods["aon-1"]["runs"][2]["sec_per_epoch"] = math.nan
    scores = {n: [r["test_acc"] for r in m["runs"]] for n, m in methods.items()}
    return {
        "commit": "0" * 40,
        "machine": {
            "platform": "test",
            "processor": "cpu",
            "cpu_count": 2,
            "python": "3",
            "torch": "2",
            "threads": 1,
            "device": "cpu",
        },
        "split": {"train": 3600, "val": 400, "test": 1000},
        "units": "accuracies are fractions in [0, 1]",
        "config": {
            "command": "compare",
            "dataset": "mnist1d",
            "model": "mlp",
            "methods": list(METHODS),
            "epochs": EPOCHS,
            "seeds": SEEDS,
            "eval_seeds": list(range(SEEDS)),
            "tune": False,
            "tune_seeds": [],
            "grid": None,
            "batch_size": 100,
            "lr": 0.01,
            "scale": "all weight layers except the classifier",
        },
        "references": ["plain", "soft"],
        "methods": methods,
        "comparisons": stats.compare(
            scores, [("aon-1", "plain"), ("aon-1", "soft"), ("soft", "plain")], resamples=200
        ),
    }


def _results_dir(root: Path, payload: dict[str, Any]) -> Path:
    """A results folder as compare leaves it: results.json/.csv/.md (write_results), a config
    and a checkpoint."""
    folder = root / "results"
    write_results(folder, payload)
    (folder / "config.json").write_text(json.dumps(payload["config"]) + "\n")
    (folder / "runs" / "plain").mkdir(parents=True)
    (folder / "runs" / "plain" / "seed0.pt").write_bytes(b"not a real checkpoint")
    return folder


def _hashes(folder: Path, skip: str | None = None) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (and every folder, as ``dir``), by relative path;
    ``skip``: a top-level entry left out."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if skip is not None and rel.parts[0] == skip:
            continue
        out[rel.as_posix()] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _assert_pngs(folder: Path) -> None:
    for name in PLOTS:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 5_000, name  # an image with axes and text, not an empty file


# --------------------------------------------------------------------------- the numbers


def test_steps_per_epoch_rounds_up_and_needs_both_sizes() -> None:
    assert steps_per_epoch({"batch_size": 100}, {"train": 3600}) == 36
    assert steps_per_epoch({"batch_size": 100}, {"train": 3601}) == 37
    assert steps_per_epoch({"batch_size": 100}, None) is None
    assert steps_per_epoch({}, {"train": 3600}) is None
    assert steps_per_epoch({"batch_size": True}, {"train": 3600}) is None
    assert steps_per_epoch({"batch_size": 100}, {"train": 0}) is None


def test_layer_band_means_runs_then_takes_median_and_range_over_layers() -> None:
    runs = [
        {"history": [{"epoch": 1, "cond": {"a": 1.0, "b": 4.0, "c": 10.0}}]},
        {"history": [{"epoch": 1, "cond": {"a": 3.0, "b": math.nan, "c": None}}]},
        {"history": [{"epoch": 1, "cond": {"a": math.inf, "b": 6.0, "c": 30.0}}]},
    ]
    # per layer over the runs (finite only): a 2, b 5, c 20
    assert layer_band(runs, "cond") == ([1], [5.0], [2.0], [20.0])
    # an epoch of non-finite values only is left out; a run without the key adds nothing
    runs[0]["history"].append({"epoch": 2, "cond": {"a": math.nan}})
    runs[1]["history"].append({"epoch": 2})
    assert layer_band(runs, "cond") == ([1], [5.0], [2.0], [20.0])
    assert layer_band(runs, "grad_norm") == ([], [], [], [])


def test_mean_curve_skips_values_that_are_not_finite() -> None:
    runs: list[dict[str, Any]] = [
        {"history": [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": math.nan}]},
        {"history": [{"epoch": 1, "train_loss": 3.0}, {"epoch": 2, "train_loss": 0.5}]},
        {"history": "not a list"},
    ]
    assert mean_curve(runs, "train_loss") == ([1, 2], [2.0, 0.5])
    assert mean_curve(runs, "val_acc") == ([], [])


def test_speed_point_is_time_per_step_against_percent_with_the_interval() -> None:
    rs = [
        {"sec_per_epoch": 0.3, "test_acc": 0.5},
        {"sec_per_epoch": math.nan, "test_acc": 0.7},
        {"sec_per_epoch": 0.5},
    ]
    x, y, err = speed_point(rs, 10, [0.55, 0.62])  # type: ignore[misc]
    assert x == pytest.approx(0.04)
    assert y == pytest.approx(60.0)
    assert err == pytest.approx((5.0, 2.0))
    assert speed_point(rs, None, [0.55, math.nan]) == pytest.approx((0.4, 60.0, None))
    assert speed_point([{"sec_per_epoch": math.inf, "test_acc": 0.5}], 10, None) is None


# --------------------------------------------------------------------------- aon-func report


def test_report_writes_out_and_leaves_dir_byte_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _results_dir(tmp_path, _payload())
    before = _hashes(folder)
    out = tmp_path / "elsewhere" / "report"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert _hashes(folder) == before
    _assert_pngs(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.md", "results.csv", *PLOTS])
    # the tables are the ones compare writes, from the same results.json
    assert (out / "results.md").read_bytes() == (folder / "results.md").read_bytes()
    assert (out / "results.csv").read_bytes() == (folder / "results.csv").read_bytes()
    md = (out / "results.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in md, name
    assert "| aon-1 | AON K=1 |" in md
    printed = capsys.readouterr().out
    assert any(line.startswith("aon-1 ") for line in printed.splitlines())
    assert str(out / "results.md") in printed


def test_report_of_an_old_results_json_into_the_default_folder(tmp_path: Path) -> None:
    payload = _payload()
    for m in payload["methods"].values():
        for r in m["runs"]:
            for h in r["history"]:
                del h["cond"], h["grad_norm"]
    folder = _results_dir(tmp_path, payload)
    before = _hashes(folder)
    assert main(["report", str(folder)]) == 0
    assert _hashes(folder, skip="report") == before
    _assert_pngs(folder / "report")


def test_write_plots_skips_what_is_missing_or_not_finite(tmp_path: Path) -> None:
    runs: list[dict[str, Any]] = [
        {"method": "plain"},
        {"method": "plain", "history": [{"epoch": 1, "train_loss": math.nan}]},
        {"method": "aon-1", "spectrum": [math.nan, 0.0], "test_acc": math.inf, "history": []},
    ]
    written = write_plots(tmp_path, {"batch_size": 100}, runs, intervals={"plain": [None, 1]})
    assert [p.name for p in written] == list(PLOTS)
    _assert_pngs(tmp_path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no results.json", "DIR {dir}: no results.json"),
        ("not JSON", "DIR {dir}: results.json is not valid JSON"),
        ("not a results file", "DIR {dir}: results.json is not one that compare or train writes"),
        ("OUT not empty", "--out {out}: exists and is not empty"),
        ("OUT a file", "--out {out}: exists and is not a folder"),
    ],
)
def test_report_refuses_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    out = tmp_path / "out"
    if case == "not JSON":
        (folder / "results.json").write_text('{"methods": ')
    elif case == "not a results file":
        payload = _payload()
        del payload["methods"]["soft"]["runs"]
        (folder / "results.json").write_text(json.dumps(payload))
    elif case.startswith("OUT"):
        (folder / "results.json").write_text(json.dumps(_payload()))
        if case == "OUT a file":
            out.write_text("mine")
        else:
            out.mkdir()
            (out / "mine.txt").write_text("mine")
    before = _hashes(tmp_path)
    assert main(["report", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aon-func: error: " + message.format(dir=folder, out=out)), err
    assert err.count("\n") == 1, err
    assert _hashes(tmp_path) == before


def test_report_names_the_missing_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(experiments_cli, "missing_extra", lambda: ["matplotlib"])
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "aon-func: error: report needs the experiments extra (matplotlib not installed): "
        'pip install "aon-func[experiments]"\n'
    )
