"""The study protocol: validation split, subsampling, test set read once, tuning on
validation, the reference methods and pairs, the results.json schema, the verdict line."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("numpy", reason="the experiments extra (numpy) is not installed")

from aon_func._cli import main
from aon_func._experiments import protocol, stats
from aon_func._experiments.data import (
    DataError,
    Dataset,
    split_validation,
    subsample,
    val_size,
)
from aon_func._experiments.methods import parse_method, parse_methods

TINY = ["--dataset", "digits", "--epochs", "1", "--quiet"]


def _toy(n: int = 50) -> Dataset:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    return Dataset("toy", x, torch.arange(n) % 10, -x[:7], torch.arange(7) % 10, 10)


# --------------------------------------------------------------------------- split


def test_the_validation_split_is_carved_from_train_and_fixed_per_seed() -> None:
    data = _toy(50)
    a, a2, b = (split_validation(data, 0.2, s) for s in (0, 0, 1))
    assert a.sizes() == {"train": 40, "val": 10, "test": 7}
    seen = sorted(torch.cat([a.x_train, a.x_val]).flatten().tolist())
    assert seen == list(range(50))  # disjoint, and nothing lost
    assert torch.equal(a.x_val, a2.x_val)
    assert torch.equal(a.x_train, a2.x_train)
    assert not torch.equal(a.x_val, b.x_val)  # another seed, another split
    assert torch.equal(a.x_test, data.x_test)  # the test set is never split
    assert val_size(50, 0.001) == 1
    assert val_size(2, 0.99) == 1
    with pytest.raises(DataError, match="at least 2"):
        val_size(1, 0.5)


def test_subsample_is_one_fixed_subset() -> None:
    data = _toy(50)
    a, b = subsample(data, 20), subsample(data, 20)
    assert a.x_train.shape[0] == 20
    assert torch.equal(a.x_train, b.x_train)
    assert len(set(a.x_train.flatten().tolist())) == 20
    assert subsample(data, None) is data
    with pytest.raises(DataError, match="--train-size 51: toy has only 50"):
        subsample(data, 51)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-size", "5000"], "--train-size 5000: digits has only 1437 training examples"),
        (["--train-size", "1"], "--train-size 1: at least 2"),
    ],
)
@pytest.mark.usefixtures("no_data")
def test_train_size_is_checked_before_any_data(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(["compare", *TINY, *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--val-fraction", "1.5"], "--val-fraction: expected a number in (0, 1)"),
        (["--val-fraction", "0"], "expected a number in (0, 1)"),
        (["--tune-lrs", "0.01,x"], "--tune-lrs: expected comma-separated positive numbers"),
        (["--tune-orders", "1,-2"], "--tune-orders: expected comma-separated orders >= 0"),
        (["--tune-scales", "all:none"], "--tune-scales: expected comma-separated HEAD:GAIN"),
        (["--activation", "gelu"], "invalid choice"),
    ],
)
def test_protocol_option_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["compare", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_test_set_is_read_once_per_run_after_the_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aon_func._experiments import train as train_mod

    real = train_mod._Run.evaluate
    calls: list[int] = []

    def spy(self: Any, params: Any, tstate: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        calls.append(int(x.shape[0]))
        return real(self, params, tstate, x, y)

    monkeypatch.setattr(train_mod._Run, "evaluate", spy)
    argv = ["train", "--method", "es", "--dataset", "digits", "--epochs", "3", "--seeds", "1"]
    assert main([*argv, "--quiet", "--out", str(tmp_path / "o")]) == 0
    assert calls == [144, 144, 144, 360]  # validation after each epoch, then the test set
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    run = res["methods"]["es"]["runs"][0]
    assert all("test_acc" not in h for h in run["history"])
    assert [h["epoch"] for h in run["history"]] == [1, 2, 3]


# --------------------------------------------------------------------------- grids


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("aon", 18),
        ("aon-2", 6),
        ("aon-fro", 18),
        ("soft", 9),
        ("srip:0.1", 3),
        ("plain", 3),
        ("wd", 9),
        ("es", 3),
        ("orth", 6),
        ("ns", 6),
        ("sn", 6),
    ],
)
def test_every_method_gets_at_most_a_3x3x2_grid(name: str, size: int) -> None:
    points = protocol.grid(parse_method(name), protocol.DEFAULT_TUNE)
    assert len(points) == size
    assert len({p.key() for p in points}) == size
    assert {p.lr for p in points} == set(protocol.DEFAULT_TUNE.lrs)


def test_a_tunable_name_gets_the_grid_values() -> None:
    points = protocol.grid(parse_method("aon"), protocol.DEFAULT_TUNE)
    assert sorted({p.method.name for p in points}) == ["aon-1", "aon-2", "aon-4"]
    points = protocol.grid(parse_method("soft"), protocol.DEFAULT_TUNE)
    assert sorted({p.method.lam for p in points}) == [1e-4, 1e-3, 1e-2]
    assert {(p.normalise_head, p.gain) for p in points} == {(False, "learnable")}


def test_select_takes_the_best_mean_validation_accuracy_first_on_ties() -> None:
    assert protocol.select([[0.5, 0.7], [0.7, 0.6], [0.1, 0.2]]) == 1
    assert protocol.select([[0.6], [0.6], [0.5]]) == 0
    with pytest.raises(ValueError, match="no configuration"):
        protocol.select([])


def test_references_are_plain_and_the_best_regulariser_by_validation() -> None:
    methods = parse_methods("plain,soft:0.01,srip:0.1,aon-1")
    val = {"plain": 0.9, "soft:0.01": 0.8, "srip:0.1": 0.85, "aon-1": 0.99}
    assert protocol.references(methods, val) == ["plain", "srip:0.1"]
    assert protocol.pairs(["plain", "srip:0.1", "aon-1"], ["plain", "srip:0.1"]) == [
        ("srip:0.1", "plain"),
        ("aon-1", "plain"),
        ("aon-1", "srip:0.1"),
    ]
    assert protocol.references(parse_methods("aon-1,sn"), {"aon-1": 1, "sn": 1}) == []


def test_commit_is_the_checkout_or_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    found = protocol.commit()
    assert found == "unknown" or re.fullmatch(r"[0-9a-f]{40}", found)

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert protocol.commit() == "unknown"


# --------------------------------------------------------------------------- tune, end to end


TUNED = [
    "compare",
    *TINY,
    "--methods",
    "plain,soft,aon",
    "--seeds",
    "2",
    "--tune",
    "--tune-seeds",
    "2",
    "--tune-lrs",
    "1e-5,1e-2",
    "--tune-orders",
    "1,2",
    "--tune-lambdas",
    "1e-3",
    "--tune-scales",
    "free:learnable",
    "--train-size",
    "600",
]
"""A small tuned comparison: two learning rates, two orders, one penalty weight, 2 + 2 seeds."""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("tuned") / "out"
    argv = [*TUNED, "--out", str(out)]
    assert main(argv) == 0
    res: dict[str, Any] = json.loads((out / "results.json").read_text())
    res["_out"] = out
    return res


def test_tune_selects_on_validation_and_reports_other_seeds(tuned: dict[str, Any]) -> None:
    assert tuned["config"]["tune_seeds"] == [0, 1]
    assert tuned["config"]["eval_seeds"] == [2, 3]
    assert tuned["split"] == {"train": 540, "val": 60, "test": 360}
    aon = tuned["methods"]["aon"]
    assert len(aon["grid"]) == 4
    assert len(tuned["methods"]["plain"]["grid"]) == 2
    best = max(aon["grid"], key=lambda g: g["val_acc"])
    sel = aon["selected"]
    assert (sel["method"], sel["lr"]) == (best["method"], best["lr"])
    assert sel["lr"] == 1e-2  # 1 epoch at lr 1e-5 learns nothing: validation rejects it
    for g in aon["grid"]:
        assert len(g["val_accs"]) == 2
        assert g["val_acc"] == pytest.approx(sum(g["val_accs"]) / 2)
    for r in aon["runs"]:
        assert r["seed"] in (2, 3)
        assert r["config"]["method"] == sel["method"]
        assert r["config"]["lr"] == sel["lr"]
        assert r["method"] == "aon"


def test_results_json_schema(tuned: dict[str, Any]) -> None:
    for key in ("commit", "machine", "split", "config", "methods", "comparisons", "summary"):
        assert key in tuned, key
    assert tuned["machine"]["cpu_count"] >= 1
    assert tuned["machine"]["torch"] == torch.__version__
    for m in tuned["methods"].values():
        assert set(m) >= {"selected", "grid", "runs", "test_acc_mean", "test_acc_ci95"}
        lo, hi = m["test_acc_ci95"]
        assert 0.0 <= lo <= m["test_acc_mean"] <= hi <= 1.0
        for r in m["runs"]:
            assert set(r) >= {
                "seed",
                "val_acc",
                "test_acc",
                "train_loss",
                "ortho_error",
                "history",
                "spectrum",
                "config",
            }
            assert 0.0 <= r["test_acc"] <= 1.0  # fractions, not percent
    assert tuned["references"] == ["plain", "soft"]
    comps = tuned["comparisons"]
    assert [(c["a"], c["b"]) for c in comps] == [
        ("soft", "plain"),
        ("aon", "plain"),
        ("aon", "soft"),
    ]
    for c in comps:
        assert set(c) >= {"a", "b", "diff_mean", "ci95", "p", "p_holm"}
        a = [r["test_acc"] for r in tuned["methods"][c["a"]]["runs"]]
        b = [r["test_acc"] for r in tuned["methods"][c["b"]]["runs"]]
        assert c["diff_mean"] == pytest.approx(sum(a) / 2 - sum(b) / 2)
        assert c["p_holm"] >= c["p"]
        assert c["significant"] is None  # 2 seeds: no verdict
    md = (tuned["_out"] / "results.md").read_text()
    assert "## Comparisons" in md
    assert stats.SMOKE_TEST in md
    assert "| aon | soft |" in md


def test_tune_resumes_to_the_same_results(tuned: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tuned["_out"], out)
    argv = [*TUNED, "--out", str(out), "--resume"]
    assert main(argv) == 0
    new = json.loads((out / "results.json").read_text())
    assert new["methods"] == tuned["methods"]


def test_train_writes_no_comparisons(tmp_path: Path) -> None:
    assert main(["train", "--method", "aon-1", *TINY, "--seeds", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["comparisons"] == []
    assert list(res["methods"]) == ["aon-1"]


def test_five_seeds_print_a_verdict_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "compare",
        *TINY,
        "--methods",
        "plain,soft,aon-1",
        "--seeds",
        "5",
        "--train-size",
        "300",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert stats.SMOKE_TEST not in out
    verdict = [ln for ln in out.splitlines() if ln.startswith("verdict: ")]
    assert len(verdict) == 1
    # five seeds: the smallest exact two-sided p is 2/32 > 0.05, so nothing can be significant
    assert verdict[0] == "verdict: no significant difference in 3 comparison(s) (Holm, alpha 0.05)"
    assert out.count(" vs ") + out.count(" than ") == 3
    # after the verdict, where the credible test of the claim is (docs/results.md)
    lines = out.splitlines()
    after = lines[lines.index(verdict[0]) + 1]
    assert after.startswith("the study of the paper's claim")
    assert "docs/results.md" in after
    assert lines[-1].startswith("results: ")
