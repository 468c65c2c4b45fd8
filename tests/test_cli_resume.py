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


def _assert_same_run(a: Path, b: Path) -> None:
    ra = json.loads((a / "results.json").read_text())["runs"]
    rb = json.loads((b / "results.json").read_text())["runs"]
    assert _strip_timing(ra) == _strip_timing(rb)
    for rel in CKPTS:
        ca, cb = load_checkpoint(a / rel), load_checkpoint(b / rel)
        assert ca["epoch"] == cb["epoch"] == 12
        for part in ("params", "transform_state", "penalty_state"):
            assert ca[part].keys() == cb[part].keys()
            for k in ca[part]:
                assert torch.equal(ca[part][k], cb[part][k]), (rel, part, k)
        assert ca["adam"]["step"] == cb["adam"]["step"]
        for k in ca["adam"]["m"]:
            assert torch.equal(ca["adam"]["m"][k], cb["adam"]["m"][k])
            assert torch.equal(ca["adam"]["v"][k], cb["adam"]["v"][k])
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


def test_sigkill_then_resume_is_bitwise_equal(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _start_and_stop(out, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    ckpt = load_checkpoint(out / CKPTS[0])
    assert 1 <= ckpt["epoch"] < 12, "the run was not stopped part-way"
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    _assert_same_run(reference, out)


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

            def stop(epoch: int) -> None:
                if epoch == 5:
                    raise KeyboardInterrupt

            kwargs["on_epoch"] = stop
        return real(*args, **kwargs)

    from aon_func._experiments import cli

    monkeypatch.setattr(cli, "train_run", interrupted)
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
