"""``aon-func compare`` / ``train``: argument errors, outputs, --quiet, the --out policy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import aon_func
from aon_func._cli import main
from aon_func._experiments.methods import parse_method, parse_methods
from aon_func._experiments.stats import SMOKE_TEST

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--dataset", "digits", "--epochs", "2", "--seeds", "2"]


def all_runs(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every reported run of a ``results.json``, method by method."""
    return [r for m in res["methods"].values() for r in m["runs"]]


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--methods", "plain,bogus"], "unknown method 'bogus'"),
        (
            ["compare", "--methods", "aon3,foo"],
            "unknown methods 'aon3' (did you mean 'aon-3'?), 'foo'",
        ),
        (
            ["compare", "--methods", "polr,srp"],
            "'polr' (did you mean 'polar'?), 'srp' (did you mean",
        ),
        (["train", "--method", "sorf:1e-3"], "'sorf:1e-3' (did you mean 'soft:1e-3'?)"),
        (["compare", "--methods", "sn,sn"], "more than once"),
        (["compare", "--methods", ""], "empty"),
        (["compare", "--epochs", "0"], "positive integer"),
        (["compare", "--seeds", "two"], "positive integer"),
        (["compare", "--lr", "-1"], "positive number"),
        (["compare", "--gain", "big"], "'none', 'learnable' or a positive number"),
        (["compare", "--gain", "-2"], "positive"),
        (["compare", "--dataset", "imagenet"], "invalid choice"),
        (["compare", "--model", "vit"], "invalid choice"),
        (["compare", "--device", "tpu"], "invalid choice"),
        (["train"], "--method"),
        (["train", "--method", "soft:abc"], "unknown method"),
    ],
)
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--dataset", "mnist1d", "--model", "resnet"],
            "--model resnet does not fit: --dataset mnist1d has examples of shape (40,)",
        ),
        (["--dataset", "digits", "--data-dir", "."], "--data-dir is for mnist and cifar10"),
        (["--dataset", "mnist"], "give --data-dir DIR"),
        (["--extend"], "--extend trains the runs of a folder on: use it with --resume"),
    ],
)
@pytest.mark.usefixtures("no_data")
def test_usage_errors_are_one_line_before_any_data(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["compare", *argv, "--epochs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("a-file", "is a file, not a folder"),
        ("a-file/below", "cannot create the folder"),
        ("/proc/aon-func-out", "cannot create the folder"),
    ],
)
@pytest.mark.usefixtures("no_data")
def test_out_that_cannot_be_a_folder_fails_before_any_data(
    where: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if where.startswith("/proc") and not Path("/proc").is_dir():
        pytest.skip("no /proc on this system: the other cases cover --out")
    (tmp_path / "a-file").write_text("a user's file\n")
    out = Path(where) if where.startswith("/") else tmp_path / where
    rc = main(["train", "--method", "sn", *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"aon-func: error: --out {out}")
    assert message in err
    assert err.count("\n") == 1
    assert (tmp_path / "a-file").read_text() == "a user's file\n"


def test_cuda_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is valid")
    rc = main(["train", "--method", "sn", *TINY, "--device", "cuda", "--out", str(tmp_path)])
    assert rc == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_method_names() -> None:
    assert parse_method("aon").order == aon_func.DEFAULT_ORDER
    assert parse_method("AON-4").order == 4
    assert parse_method("sn").order == 0
    assert parse_method("oni-3").iterations == 3
    assert parse_method("soft:1e-2").lam == pytest.approx(0.01)
    assert parse_method("soft:0.010").name == "soft:0.01"
    assert parse_method("srip").kind == "penalty"
    assert [m.name for m in parse_methods("plain, polar ,ns-2")] == ["plain", "polar", "ns-2"]


# --------------------------------------------------------------------------- a quick compare


ALL = "plain,sn,soft,srip:0.1,oni,ns,polar,aon,aon-2"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("quick") / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aon_func",
            "compare",
            *TINY,
            "--methods",
            ALL,
            "--gain",
            "learnable",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, proc.stderr


def test_compare_writes_every_output(quick: tuple[Path, str, str]) -> None:
    out, stdout, stderr = quick
    for name in (
        "results.json",
        "results.csv",
        "results.md",
        "accuracy.png",
        "spectra.png",
        "config.json",
    ):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "results.json").read_text())
    methods = ALL.split(",")
    assert [r["method"] for r in res["summary"]] == ["soft" if m == "soft" else m for m in methods]
    assert len(all_runs(res)) == 2 * len(methods)
    assert res["config"]["gain"] == "learnable"
    assert "learnable scalar gain" in res["config"]["scale"]
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].startswith("method,label,seeds,test_acc_mean,test_acc_std,test_acc_ci95_lo")
    assert len(csv) == 1 + len(methods)
    md = (out / "results.md").read_text()
    assert "| aon-2 | AON K=2 |" in md
    # the printed table: one line per method, and where the files are
    for m in methods:
        assert any(line.startswith(m + " ") for line in stdout.splitlines()), m
    assert "results.md" in stdout
    # not on a terminal: one line per finished run, no progress bar
    assert stderr.count("seed 1: val acc") == len(methods)
    assert "\r" not in stderr


def test_compare_results_make_sense(quick: tuple[Path, str, str]) -> None:
    res = json.loads((quick[0] / "results.json").read_text())
    runs = {(r["method"], r["seed"]): r for r in all_runs(res)}
    assert runs[("polar", 0)]["ortho_error"] < 1e-4
    # one power-iteration step per training step: the estimate of s_max lags a little
    assert max(runs[("sn", 0)]["spectrum"]) == pytest.approx(1.0, abs=0.2)
    assert max(runs[("aon-2", 0)]["spectrum"]) == pytest.approx(1.0, abs=0.2)
    assert runs[("aon-2", 0)]["ortho_error"] < runs[("sn", 0)]["ortho_error"]
    assert set(runs[("aon-2", 0)]["gains"]) == {"fc1.weight", "fc2.weight"}
    assert runs[("plain", 0)]["gains"] == {}
    for r in all_runs(res):
        assert 0.0 <= r["test_acc"] <= 1.0
        assert 0.0 <= r["val_acc"] <= 1.0
        assert len(r["history"]) == 2
        assert r["sec_per_epoch"] > 0
    # same init and data order: seed 0 and seed 1 differ, methods share the seed's init
    assert runs[("plain", 0)]["test_acc"] != runs[("plain", 1)]["test_acc"] or (
        runs[("plain", 0)]["train_loss"] != runs[("plain", 1)]["train_loss"]
    )


def test_existing_results_are_never_overwritten(
    quick: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(quick[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc = main(["compare", *TINY, "--methods", "sn", "--seeds", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "writing to" in captured.err
    assert f"{out}-2" in captured.err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert (tmp_path / "out-2" / "results.json").is_file()


def test_resume_of_finished_runs_reproduces_results(
    quick: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(quick[0], out)
    rc = main(
        [
            "compare",
            *TINY,
            "--methods",
            ALL,
            "--gain",
            "learnable",
            "--out",
            str(out),
            "--resume",
            "--quiet",
        ]
    )
    assert rc == 0
    old = json.loads((quick[0] / "results.json").read_text())
    new = json.loads((out / "results.json").read_text())
    assert new["methods"] == old["methods"]
    assert new["comparisons"] == old["comparisons"]


def test_resume_refuses_another_configuration(
    quick: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(quick[0], out)
    rc = main(
        [
            "compare",
            *TINY,
            "--methods",
            ALL,
            "--lr",
            "0.1",
            "--gain",
            "learnable",
            "--out",
            str(out),
            "--resume",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "was started with other options (lr 0.01 there, 0.1 now)" in err
    assert err.count("\n") == 1


def test_output_paths_are_checked_before_the_work(
    quick: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(quick[0])
    afile = tmp_path / "afile"
    afile.write_text("x")
    missing = tmp_path / "nodir"
    for argv, message in (
        (["approx", folder, "--json", str(missing / "a.json")], "is not a writable folder"),
        (["jacobian", folder, "--json", str(missing / "j.json")], "is not a writable folder"),
        (["jacobian", folder, "--plot", str(afile / "j.png")], "is not a writable folder"),
        (["report", folder, "--out", str(afile / "r")], "cannot create the folder"),
        (["bench", "--quick", "--json", str(missing / "b.json")], "is not a folder"),
        (["bench", "--quick", "--json", str(tmp_path)], "is a folder"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert err.count("\n") == 1, err
    assert not missing.exists()


def test_approx_skips_a_run_whose_checkpoint_is_gone(
    quick: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As after ``--resume --extend``: the archived results name checkpoints trained on since."""
    out = tmp_path / "out"
    shutil.copytree(quick[0], out)
    (out / "runs" / "aon-2" / "seed0.pt").unlink()
    assert main(["approx", str(out), "--max-order", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        "aon-func approx: aon-2 seed 0: checkpoint runs/aon-2/seed0.pt not found; skipped\n"
    )


def test_a_diverged_run_is_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["compare", "--dataset", "digits", "--epochs", "1", "--seeds", "1", "--quiet"]
    assert main([*argv, "--methods", "plain,soft", "--lr", "1e10", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(all_runs(res)) == 2
    capsys.readouterr()


# --------------------------------------------------------------------------- quiet and progress


def test_quiet_is_silent_even_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc = main(["train", "--method", "aon-2", *TINY, "--out", str(tmp_path / "q"), "--quiet"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0].startswith("digits / mlp, 2 epochs")
    assert lines[1].split() == [
        "method",
        "test",
        "acc",
        "(%)",
        "95%",
        "CI",
        "val",
        "acc",
        "train",
        "loss",
        "orth.",
        "err",
        "s/epoch",
        "what",
    ]
    assert lines[3].startswith("aon-2 ")
    assert lines[4] == f"verdict: {SMOKE_TEST} (2 seed(s); 5 or more give one)"
    assert lines[-1].startswith("results: ")
    assert len(lines) == 6


def _on_a_terminal(argv: list[str], columns: int) -> tuple[int, str]:
    """Run ``python -m aon_func ARGV`` with stderr on a pseudo-terminal ``columns`` wide."""
    fcntl = pytest.importorskip("fcntl", reason="pseudo-terminals need a POSIX system")
    pty = pytest.importorskip("pty", reason="pseudo-terminals need a POSIX system")
    termios = pytest.importorskip("termios", reason="pseudo-terminals need a POSIX system")
    import os
    import struct

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aon_func", *argv],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    rc = proc.wait(timeout=120)
    # the terminal turns "\n" into "\r\n"; what is left of "\r" is tqdm's
    return rc, b"".join(chunks).decode().replace("\r\n", "\n")


def test_one_progress_bar_over_all_runs_on_a_terminal(tmp_path: Path) -> None:
    argv = ["compare", "--methods", "plain,sn", *TINY, "--out", str(tmp_path / "p")]
    rc, err = _on_a_terminal(argv, columns=120)
    assert rc == 0, err
    assert "\r" in err  # a bar, redrawn in place
    assert "/8 " in err  # one bar: 2 methods x 2 seeds x 2 epochs
    for run in ("run 1/4 plain seed 0", "run 4/4 sn seed 1"):
        assert run in err
    assert "8/8" in err
    assert re.search(r"val=\d+\.\d%", err), err  # validation accuracy in %, as in the table
    assert err.count("\n") == 1  # the one bar, left on screen when done
    assert "test acc" not in err  # no per-run lines besides the bar


def test_a_zero_column_terminal_gets_lines_not_a_bar(tmp_path: Path) -> None:
    argv = ["compare", "--methods", "plain,sn", *TINY, "--out", str(tmp_path / "p")]
    rc, err = _on_a_terminal(argv, columns=0)
    assert rc == 0, err
    assert "\r" not in err
    lines = err.splitlines()
    assert all(line.strip() for line in lines), err  # no blank lines
    assert len(lines) == 4
    assert lines[0].startswith("plain seed 0: val acc ")


def test_console_script_and_module(tmp_path: Path) -> None:
    script = shutil.which("aon-func")
    if script is None:
        pytest.skip("the aon-func console script is not installed (pip install -e .)")
    for cmd in ([script], [sys.executable, "-m", "aon_func"]):
        proc = subprocess.run(
            [*cmd, "compare", "--help"], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr
        for option in (
            "--dataset",
            "--data-dir",
            "--model",
            "--methods",
            "--epochs",
            "--seeds",
            "--out",
            "--device",
            "--quiet",
            "--resume",
            "--normalise-head",
            "--gain",
        ):
            assert option in proc.stdout
