"""The Jacobian spectra of a results folder (aon_func._experiments.jacobian) on a real tiny run."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("numpy", reason="the experiments extra (numpy) is not installed")
pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")

from aon_func._experiments import jacobian as jac
from aon_func._experiments import train
from aon_func._zoo import DeepCNN, DeepMLP

METHODS = "plain,sn,aon-1,aon-2,aon-4,oni,ns,polar,soft,srip,orth,orth-exp,aon-fro-2,wd,es"
RAW = ("plain", "soft", "srip", "wd", "es")
"""The methods without a transform: the same raw initial weights for a seed."""

TINY = [
    "--dataset", "digits", "--train-size", "200", "--model", "deep-mlp", "--depth", "5",
    "--width", "12", "--activation", "tanh", "--epochs", "1", "--batch-size", "20",
    "--seeds", "1", "--quiet",
]  # fmt: skip


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real compare folder of every method, and each run's initial (params, state) as
    ``train_run`` built them (captured, cloned before training moves them)."""
    from aon_func._cli import main

    out = tmp_path_factory.mktemp("jac") / "out"
    captured: dict[str, tuple[Any, dict[str, Tensor], dict[str, Tensor]]] = {}
    first_states = train._Run.initial_states

    def initial_states(
        self: Any, params: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        tstate, pstate = first_states(self, params)
        captured[self.cfg.method] = (
            self,
            {k: v.detach().clone() for k, v in params.items()},
            {k: v.clone() for k, v in tstate.items()},
        )
        return tstate, pstate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train._Run, "initial_states", initial_states)
        assert main(["compare", *TINY, "--methods", METHODS, "--out", str(out)]) == 0
    before = _digest(out)
    rows = jac.from_results(out)
    return {"out": out, "rows": rows, "before": before, "captured": captured}


def _row(rows: list[dict[str, Any]], trained_with: str, when: str, which: str) -> dict[str, Any]:
    (r,) = [
        r
        for r in rows
        if r["trained_with"] == trained_with and r["when"] == when and r["jacobian"] == which
    ]
    return r


def test_every_method_has_both_jacobians_at_init_and_trained(folder: dict[str, Any]) -> None:
    rows = folder["rows"]
    res = json.loads((folder["out"] / "results.json").read_text(encoding="utf-8"))
    assert len(rows) == len(res["methods"]) * 2 * 2
    assert not [r for r in rows if "skipped" in r]
    json.dumps(rows, allow_nan=False)  # JSON-serialisable, no NaN or infinity
    for r in rows:
        s = torch.tensor(r["singular_values"])
        assert s.shape == ((8, 10) if r["jacobian"] == "input-output" else (8, 12))
        assert r["shape"] == ([10, 64] if r["jacobian"] == "input-output" else [12, 12])
        assert bool(torch.isfinite(s).all()), r["method"]
        assert bool((s > 0).all()), r["method"]
        assert bool((s[:, :-1] >= s[:, 1:]).all())  # descending per input
        assert r["max"] >= r["median"] >= r["min"] > 0
        assert r["cond"] == pytest.approx(math.exp(torch.log(s[:, 0] / s[:, -1]).mean()))
        assert 0 < r["frac_near_median"] <= 1
        assert r["zero_frac"] == 0.0  # tanh: full rank
        assert r["epoch"] == (0 if r["when"] == "init" else 1)


def test_init_and_trained_differ(folder: dict[str, Any]) -> None:
    rows = folder["rows"]
    for method in {r["trained_with"] for r in rows}:
        for which in jac.JACOBIANS:
            a = _row(rows, method, "init", which)["singular_values"]
            b = _row(rows, method, "trained", which)["singular_values"]
            assert a != b, (method, which)


def test_init_is_exactly_the_network_training_started_from(folder: dict[str, Any]) -> None:
    rows, x = folder["rows"], torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert set(folder["captured"]) == {r["trained_with"] for r in rows}
    for method, (run, params, tstate) in folder["captured"].items():
        with torch.no_grad():
            weights, _ = run.weights(params, tstate, False)
        for which in jac.JACOBIANS:
            want = jac.jacobian_spectrum(run.model, weights, x, jacobian=which)
            got = _row(rows, method, "init", which)
            assert got["singular_values"] == want["singular_values"], (method, which)
    # the raw methods share one initial network; a transform changes it
    spectra = {m: _row(rows, m, "init", "input-output")["singular_values"] for m in RAW}
    assert all(s == spectra["plain"] for s in spectra.values())
    for m in ("sn", "aon-1", "polar", "orth-cayley", "aon-fro-2"):
        assert _row(rows, m, "init", "input-output")["singular_values"] != spectra["plain"]


def test_orthonormal_methods_lift_the_hidden_spectrum(folder: dict[str, Any]) -> None:
    """The hidden stack of the exactly orthonormal methods (gain sqrt(2) >= 1) keeps far
    more of the spectrum than plain's default initialisation (the point of the study)."""
    rows = folder["rows"]
    plain = _row(rows, "plain", "init", "hidden")["median"]
    for m in ("polar", "orth-cayley", "orth-exp"):
        assert _row(rows, m, "init", "hidden")["median"] > 2 * plain, m


def test_the_folder_is_left_byte_identical(folder: dict[str, Any]) -> None:
    jac.from_results(folder["out"], all_runs=True, n_inputs=2)
    assert _digest(folder["out"]) == folder["before"]


def test_markdown_and_plot(folder: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the experiments extra (matplotlib) is not installed")
    rows = folder["rows"]
    text = jac.markdown(rows)
    lines = text.splitlines()
    assert lines[2].startswith("| method | seed | when | Jacobian | max | min | median | cond |")
    assert len([ln for ln in lines if ln.startswith("| aon-2 | 0 |")]) == 4
    assert "| polar | 0 | trained | hidden 12×12 |" in text
    path = tmp_path / "jacobian.png"
    jac.plot(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert jac.markdown([]) == "no run found"


def test_runs_without_checkpoints_keep_their_init_and_say_why(
    folder: dict[str, Any], tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(folder["out"], copy)
    res = json.loads((copy / "results.json").read_text(encoding="utf-8"))
    res["methods"] = {k: res["methods"][k] for k in ("plain", "aon-2", "orth-cayley")}
    del res["methods"]["plain"]["runs"][0]["checkpoint"]
    (copy / res["methods"]["aon-2"]["runs"][0]["checkpoint"]).unlink()
    (copy / "results.json").write_text(json.dumps(res), encoding="utf-8")
    rows = jac.from_results(copy)
    assert len(rows) == 12
    for method, reason in (("plain", "no checkpoint recorded"), ("aon-2", "not found")):
        for which in jac.JACOBIANS:
            assert reason in _row(rows, method, "trained", which)["skipped"]
            init = _row(rows, method, "init", which)
            assert init == {**_row(folder["rows"], method, "init", which)}
    assert "skipped" not in _row(rows, "orth-cayley", "trained", "hidden")
    text = jac.markdown(rows)
    assert "- plain seed 0, trained, input-output: skipped (no checkpoint recorded" in text


def test_test_inputs_read_the_data_set(folder: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(folder["out"], copy)
    res = json.loads((copy / "results.json").read_text(encoding="utf-8"))
    res["methods"] = {"sn": res["methods"]["sn"]}
    (copy / "results.json").write_text(json.dumps(res), encoding="utf-8")
    rows = jac.from_results(copy, inputs="test", n_inputs=3)
    assert [(r["when"], r["jacobian"], r["inputs"]) for r in rows] == [
        ("init", "input-output", "test"),
        ("init", "hidden", "test"),
        ("trained", "input-output", "test"),
        ("trained", "hidden", "test"),
    ]
    normal = _row(folder["rows"], "sn", "trained", "input-output")["singular_values"][:3]
    assert rows[2]["singular_values"] != normal
    assert "test examples" in jac.markdown(rows)
    with pytest.raises(ValueError, match="inputs 'train'"):
        jac.from_results(copy, inputs="train")


# --------------------------------------------------------------------------- unit


def _orthogonal(n: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q


def test_an_orthogonal_linear_chain_is_an_isometry() -> None:
    model = nn.Sequential(*(nn.Linear(6, 6, bias=False) for _ in range(4)))
    weights = {f"{i}.weight": _orthogonal(6, i) for i in range(4)}
    x = torch.randn(5, 6)
    out = jac.jacobian_spectrum(model, weights, x)
    s = torch.tensor(out["singular_values"], dtype=torch.float64)
    assert s.shape == (5, 6)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-6)
    assert out["cond"] == pytest.approx(1.0, abs=1e-5)
    assert out["frac_near_median"] == 1.0
    assert out["mean_log"] == pytest.approx(0.0, abs=1e-6)
    # the weights given are used, not the module's own
    scaled = {k: 3 * v for k, v in weights.items()}
    s3 = torch.tensor(jac.jacobian_spectrum(model, scaled, x)["singular_values"])
    assert torch.allclose(s3, torch.full_like(s3, 81.0), rtol=1e-5)
    with pytest.raises(RuntimeError, match="Missing key"):
        jac.jacobian_spectrum(model, {"0.weight": weights["0.weight"]}, x)


def test_the_jacobians_match_autograd() -> None:
    torch.manual_seed(0)
    mlp = DeepMLP(12, 4, depth=4, width=7, activation="tanh").double()
    weights = dict(mlp.named_parameters())
    x = torch.randn(3, 12, dtype=torch.float64)
    out = jac.jacobian_spectrum(mlp, weights, x)
    hidden = jac.jacobian_spectrum(mlp, weights, x, jacobian="hidden")
    assert hidden["shape"] == [7, 7]
    assert out["shape"] == [4, 12]
    for i in range(3):
        j = torch.autograd.functional.jacobian(lambda v: mlp(v[None])[0], x[i])
        assert torch.allclose(
            torch.tensor(out["singular_values"][i], dtype=torch.float64), torch.linalg.svdvals(j)
        )
        h1 = mlp.body[:2](x[i][None])[0]
        jh = torch.autograd.functional.jacobian(lambda v: mlp.body[2:](v[None])[0], h1)
        assert torch.allclose(
            torch.tensor(hidden["singular_values"][i], dtype=torch.float64),
            torch.linalg.svdvals(jh),
        )
    cnn = DeepCNN((1, 6, 6), 3, depth=3, width=4, activation="relu").double()
    xi = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    got = jac.jacobian_spectrum(cnn, dict(cnn.named_parameters()), xi)
    j = torch.autograd.functional.jacobian(lambda v: cnn(v[None])[0], xi[1]).reshape(3, 36)
    assert torch.allclose(
        torch.tensor(got["singular_values"][1], dtype=torch.float64), torch.linalg.svdvals(j)
    )
    with pytest.raises(ValueError, match="deep-mlp only"):
        jac.jacobian_spectrum(cnn, dict(cnn.named_parameters()), xi, jacobian="hidden")
    shallow = DeepMLP(12, 4, depth=2, width=7, activation="tanh")
    with pytest.raises(ValueError, match="one hidden layer"):
        jac.jacobian_spectrum(
            shallow, dict(shallow.named_parameters()), x.float(), jacobian="hidden"
        )


def test_summarise_counts_zeros_and_leaves_them_out_of_cond() -> None:
    s = torch.tensor([[4.0, 2.0, 1.0, 0.0], [8.0, 4.0, 2.0, 1.0]])
    out = jac.summarise(s)
    assert out["n_zero"] == 1
    assert out["zero_frac"] == pytest.approx(1 / 8)
    assert out["min"] == pytest.approx(1.0)  # of the non-zero ones
    assert out["median"] == pytest.approx(2.0)
    assert out["cond"] == pytest.approx(math.sqrt(4.0 * 8.0))
    assert out["max"] == pytest.approx(math.sqrt(4.0 * 8.0))
    assert out["mean_log"] == pytest.approx((math.log(8) / 3 + math.log(64) / 4) / 2)
    dead = jac.summarise(torch.zeros(2, 3))
    assert dead["cond"] is None
    assert dead["mean_log"] is None
    assert dead["n_zero"] == 6
    assert dead["max"] is None


def test_the_jacobian_command(
    folder: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason="the experiments extra (matplotlib) is not installed")
    from aon_func._cli import main

    out, js, png = folder["out"], tmp_path / "j.json", tmp_path / "j.png"
    argv = ["jacobian", str(out), "--n-inputs", "2", "--json", str(js), "--plot", str(png)]
    assert main(argv) == 0
    assert "| polar | 0 | trained | hidden 12×12 |" in capsys.readouterr().out
    rows = json.loads(js.read_text())
    assert {r["trained_with"] for r in rows} >= {"plain", "aon-2", "polar"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert _digest(out) == folder["before"]
    # refusals, one line each, before any work; existing files are never overwritten
    assert main(argv) == 2
    assert "--json" in capsys.readouterr().err
    assert main(["jacobian", str(tmp_path / "nothing")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["jacobian", str(out), "--n-inputs", "0"]) == 2
    assert "--n-inputs 0" in capsys.readouterr().err
