"""Nothing lost: kill a run part-way (SIGKILL, Ctrl-C), resume it, get bitwise the same run.

The reference is an uninterrupted run with the same seed. The interrupted
run is a real ``python -m aon_func`` process, stopped right after its first
checkpoint appears; ``--resume`` finishes it. Final parameters, AON state,
optimiser state and every metric (wall-clock seconds aside) must be
bitwise equal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from aon_func._cli import main
from aon_func._experiments.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# aon-2 with learnable gains (transform state and gain entries) and SRIP
# (penalty state), on MNIST-1D: 40 steps per epoch, about 0.1 s each.
ARGS = [
    "compare",
    "--methods",
    "aon-2,srip",
    "--gain",
    "learnable",
    "--epochs",
    "12",
    "--seeds",
    "1",
    "--quiet",
]
CKPTS = ("runs/aon-2/seed0.pt", "runs/srip/seed0.pt")


def _strip_timing(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        r = {k: v for k, v in r.items() if k != "sec_per_epoch"}
        r["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]
        out.append(r)
    return out


def _runs(folder: Path) -> list[dict[str, Any]]:
    res = json.loads((folder / "results.json").read_text())
    return [r for m in res["methods"].values() for r in m["runs"]]


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = _runs(a), _runs(b)
    assert _strip_timing(ra) == _strip_timing(rb)
    for rel in CKPTS:
        ca, cb = load_checkpoint(a / rel), load_checkpoint(b / rel)
        assert ca["epoch"] == cb["epoch"] == 12
        for part in ("params", "transform_state", "penalty_state"):
            assert ca[part].keys() == cb[part].keys()
            for k in ca[part]:
                assert torch.equal(ca[part][k], cb[part][k]), (rel, part, k)
        oa, ob = ca["optimizer"], cb["optimizer"]
        assert oa["names"] == ob["names"] == list(ca["params"])
        assert oa["torch"]["param_groups"] == ob["torch"]["param_groups"]
        assert oa["torch"]["state"].keys() == ob["torch"]["state"].keys()
        assert len(oa["torch"]["state"]) == len(ca["params"])
        for i, state in oa["torch"]["state"].items():
            assert (
                state.keys() == ob["torch"]["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
            )
            for k, v in state.items():
                assert torch.equal(v, ob["torch"]["state"][i][k]), (rel, i, k)
        assert torch.equal(ca["data_rng"], cb["data_rng"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def _start_and_stop(out: Path, sig: int) -> subprocess.CompletedProcess[str]:
    """Start the run in a real process and send ``sig`` once its first checkpoint exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "aon_func", *ARGS, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = out / CKPTS[0]
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _start_and_stop(out, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    ckpt = load_checkpoint(out / CKPTS[0])
    assert 1 <= ckpt["epoch"] < 12, "the run was not stopped part-way"
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    _assert_same_run(reference, out)


@pytest.mark.slow
def test_ctrl_c_leaves_a_usable_checkpoint(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _start_and_stop(out, signal.SIGINT)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert "--resume" in done.stderr
    ckpt = load_checkpoint(out / CKPTS[0])
    assert 1 <= ckpt["epoch"] < 12
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    _assert_same_run(reference, out)


def test_resume_after_an_injected_interruption_in_process(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupt inside one process at epoch 5 of the second run (after a finished first run)."""
    from aon_func._experiments import train as train_mod

    out = tmp_path / "out"
    real = train_mod.train_run

    def interrupted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if args[0].method == "srip" and not kwargs["resume"]:

            def stop(epoch: int, record: dict[str, float]) -> None:
                if epoch == 5:
                    raise KeyboardInterrupt

            kwargs["on_epoch"] = stop
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_run", interrupted)
    assert main([*ARGS, "--out", str(out)]) == 130
    assert load_checkpoint(out / CKPTS[1])["epoch"] == 5
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    _assert_same_run(reference, out)


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing leaves the previous checkpoint intact."""
    from aon_func._experiments import checkpoint as ck

    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, {"epoch": 1})

    def boom(obj: object, f: Any) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, {"epoch": 2})
    assert ck.load_checkpoint(path)["epoch"] == 1


# --------------------------------------------------------------------------- --resume and --epochs

SHORT = ["train", "--method", "aon-2", "--dataset", "digits", "--seeds", "1", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose one run finished its 2 epochs."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main([*SHORT, "--epochs", "2", "--out", str(out)]) == 0
    return out


def _files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refused(out: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``argv`` on ``out``: exit status 2, one line on stderr (returned), no file changed."""
    before = _files(out)
    rc = main([*SHORT, *argv, "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert _files(out) == before
    return err


@pytest.mark.parametrize(
    ("epochs", "message"),
    [
        ("3", "was started with --epochs 2; add --extend to train its runs on to 3 epochs"),
        ("1", "was started with --epochs 2; resume it with --epochs 2"),
    ],
)
@pytest.mark.usefixtures("no_data")
def test_resume_with_other_epochs_is_refused_before_any_data(
    finished: Path,
    epochs: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    err = _refused(out, ["--epochs", epochs], capsys)
    assert err.startswith(f"aon-func: error: --resume --epochs {epochs}: {out} ")
    assert message in err


@pytest.fixture(scope="module")
def finished_two_seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose two runs (seeds 0 and 1) finished their 2 epochs."""
    out = tmp_path_factory.mktemp("finished2") / "out"
    assert main([*SHORT, "--epochs", "2", "--seeds", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "sn", "--seeds", "2"], "holds the methods aon-2"),
        (["--seeds", "1"], "holds 2 seeds"),
    ],
)
@pytest.mark.usefixtures("no_data")
def test_resume_with_fewer_runs_than_the_folder_is_refused_before_any_data(
    finished_two_seeds: Path,
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A subset would rewrite the folder's results.json without the other runs."""
    out = tmp_path / "out"
    shutil.copytree(finished_two_seeds, out)
    err = _refused(out, ["--epochs", "2", *argv], capsys)
    assert err.startswith(f"aon-func: error: --resume: {out} holds ")
    assert message in err


def test_extend_trains_on_and_keeps_the_earlier_results(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = _files(out)
    rc = main([*SHORT, "--epochs", "3", "--out", str(out), "--resume", "--extend"])
    assert rc == 0
    assert f"the 2-epoch results of {out} are now in {out / 'epochs-2'}" in capsys.readouterr().err
    # the earlier results, unchanged, in epochs-2/
    for name in ("results.json", "results.csv", "results.md", "accuracy.png", "spectra.png"):
        assert (out / "epochs-2" / name).read_bytes() == before[Path(name)], name
    assert json.loads((out / "epochs-2" / "config.json").read_text())["epochs"] == 2
    # the run went on from its checkpoint: the same first two epochs, one more
    old = json.loads(before[Path("results.json")])["methods"]["aon-2"]["runs"][0]["history"]
    new = _runs(out)[0]["history"]
    assert [h["epoch"] for h in new] == [1, 2, 3]
    assert _strip_timing([{"history": new[:2]}]) == _strip_timing([{"history": old}])
    assert json.loads((out / "config.json").read_text())["epochs"] == 3
    assert load_checkpoint(out / "runs" / "aon-2" / "seed0.pt")["epoch"] == 3


def test_resume_of_a_folder_never_run_says_so_and_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new"
    rc = main([*SHORT, "--epochs", "1", "--out", str(out), "--resume"])
    assert rc == 0
    err = capsys.readouterr().err
    assert err == f"aon-func: --resume: {out} holds no runs yet; starting them\n"
    assert (out / "results.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "2", "--lr", "0.5"], "lr 0.01 there, 0.5 now"),
        (["--epochs", "3", "--extend", "--batch-size", "7"], "batch_size 100 there, 7 now"),
        (["--epochs", "2", "--tune", "--tune-seeds", "1"], "tune False there, True now"),
    ],
)
@pytest.mark.usefixtures("no_data")
def test_resume_with_other_options_is_refused_before_anything_is_written(
    finished: Path,
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Mixing two configurations in one folder would misreport both; config.json stays as it was."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    err = _refused(out, argv, capsys)
    assert err.startswith(f"aon-func: error: --resume: {out} was started with other options (")
    assert message in err


@pytest.mark.parametrize("damage", ["missing", "not a dict", "not json"])
@pytest.mark.usefixtures("no_data")
def test_resume_without_a_readable_config_is_refused(
    finished: Path, damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    config = out / "config.json"
    if damage == "missing":
        config.unlink()
    else:
        config.write_text("[1]\n" if damage == "not a dict" else "{not json\n")
    assert "config.json is missing or unreadable" in _refused(out, ["--epochs", "3"], capsys)


def test_out_dot_with_results_goes_beside_it(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "here"
    shutil.copytree(finished, out)
    before = _files(out)
    monkeypatch.chdir(out)
    assert main([*SHORT, "--epochs", "1", "--out", "."]) == 0
    assert _files(out) == before
    assert (tmp_path / "here-2" / "results.json").is_file()
