"""The comparison's newer methods and models: torch's orthogonal map, AON with Frobenius
prescaling, Newton-Schulz, AdamW weight decay, early stopping, the deep plain networks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("numpy", reason="the experiments extra (numpy) is not installed")

import aon_func
from aon_func._cli import main
from aon_func._experiments.methods import (
    frobenius_aon,
    parse_method,
    torch_orthogonal,
)

TINY = ["--dataset", "digits", "--seeds", "1", "--quiet"]


def _run(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "o"
    assert main([*argv, "--out", str(out)]) == 0
    res: dict[str, Any] = json.loads((out / "results.json").read_text())
    return res


def test_names_of_the_new_methods() -> None:
    assert parse_method("orth").name == "orth-cayley"
    assert parse_method("orth-exp").variant == "exp"
    assert parse_method("aon-fro-4").order == 4
    assert parse_method("aon-fro").tunable
    assert parse_method("wd").lam == pytest.approx(0.01)
    assert parse_method("wd").kind == "control"
    assert parse_method("wd:0.1").name == "wd:0.1"
    assert not parse_method("wd:0.1").tunable
    assert parse_method("es").family == "es"
    with pytest.raises(ValueError, match="did you mean 'orth'"):
        parse_method("ort")


def test_power_iterations_per_step_in_the_name() -> None:
    from aon_func._experiments.methods import Scale, make_transform, with_value

    assert parse_method("sn@4").power_iterations == 4
    assert parse_method("sn@4").order == 0
    assert parse_method("sn@1").name == "sn"  # the default is not spelled out
    m = parse_method("aon@24")
    assert (m.tunable, m.power_iterations, m.name) == (True, 24, "aon@24")
    assert with_value(m, 2).name == "aon-2@24"
    assert parse_method("AON-2@24").label == "AON K=2, 24 power it./step"
    for bad, why in [("oni@3", "for sn and aon only"), ("aon-2@0", "P >= 1")]:
        with pytest.raises(ValueError, match=why):
            parse_method(bad)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    scale = Scale(normalise_head=True, gain="none", gain_init=1.0)
    t = make_transform(parse_method("aon-2@7"), model, scale)
    assert isinstance(t, aon_func.AON)
    assert (t.order, t.n_power_iterations) == (2, 7)


def test_power_iterations_below_the_safeguard_change_nothing_for_k_ge_1(tmp_path: Path) -> None:
    # K >= 1 runs max(P, SAFEGUARD_ITERATIONS) Gram steps: @4 is the same method as @1,
    # bit for bit; SN (K = 0) runs P Miyato steps, so @4 differs from @1.
    res = _run(tmp_path, "compare", *TINY, "--epochs", "2", "--methods", "aon-2,aon-2@4,sn,sn@4")
    runs = {name: m["runs"][0] for name, m in res["methods"].items()}
    assert (
        runs["aon-2"]["history"][-1]["train_loss"] == runs["aon-2@4"]["history"][-1]["train_loss"]
    )
    assert runs["sn"]["history"][-1]["train_loss"] != runs["sn@4"]["history"][-1]["train_loss"]


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5)])
@pytest.mark.parametrize("variant", ["cayley", "exp"])
def test_torch_orthogonal_map_is_orthonormal_on_the_short_side(
    shape: tuple[int, int], variant: str
) -> None:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = torch_orthogonal(variant)(x)
    assert q.shape == x.shape
    g = q @ q.T if shape[0] <= shape[1] else q.T @ q
    assert torch.allclose(g, torch.eye(min(shape), dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("shape", [(4, 9), (9, 4)])
def test_frobenius_aon_maps_singular_values_by_f_k(order: int, shape: tuple[int, int]) -> None:
    z = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(z)
    t = s / torch.linalg.matrix_norm(z)  # Frobenius prescaling: s / ||Z||_F, all below 1
    f = aon_func.singular_value_map(t, order)
    expected = f / f.max()
    got = torch.linalg.svdvals(frobenius_aon(order)(z))
    assert torch.allclose(got, expected, atol=1e-10)
    # the spectral prescaling (the library's AON) pushes harder towards 1
    ours = aon_func.singular_value_map(s / s.max(), order)
    if order > 0:
        assert float(ours.min()) > float(expected.min())


def test_every_new_method_trains_one_tiny_run(tmp_path: Path) -> None:
    methods = "plain,orth-cayley,orth-exp,aon-fro-2,ns,wd:1,es"
    res = _run(tmp_path, "compare", *TINY, "--epochs", "2", "--methods", methods)
    runs = {name: m["runs"][0] for name, m in res["methods"].items()}
    assert list(runs) == methods.split(",")
    assert runs["orth-cayley"]["ortho_error"] < 1e-4
    assert runs["orth-exp"]["ortho_error"] < 1e-4
    assert max(runs["aon-fro-2"]["spectrum"]) == pytest.approx(1.0, abs=1e-4)  # exact SN
    assert set(runs["orth-cayley"]["gains"]) == {"fc1.weight", "fc2.weight"}
    # Newton-Schulz (Muon's quintic): most singular values near 1, not exactly
    ns = sorted(runs["ns"]["spectrum"])
    assert ns[len(ns) // 2] > 0.7
    assert ns[-1] < 1.3
    for r in runs.values():
        assert 0.0 <= r["test_acc"] <= 1.0


def test_weight_decay_shrinks_the_weights(tmp_path: Path) -> None:
    from aon_func._experiments.checkpoint import load_checkpoint

    _run(tmp_path, "compare", *TINY, "--epochs", "2", "--methods", "plain,wd:10")
    out = tmp_path / "o" / "runs"
    plain = load_checkpoint(out / "plain" / "seed0.pt")["params"]["fc2.weight"]
    decayed = load_checkpoint(out / "wd_10" / "seed0.pt")["params"]["fc2.weight"]
    assert float(decayed.norm()) < 0.9 * float(plain.norm())


def test_early_stopping_reports_the_best_validation_epoch(tmp_path: Path) -> None:
    # lr 0.3 is unstable: the validation accuracy goes down again after some epoch
    res = _run(tmp_path, "train", "--method", "es", *TINY, "--epochs", "6", "--lr", "0.3")
    run = res["methods"]["es"]["runs"][0]
    accs = [h["val_acc"] for h in run["history"]]
    best = accs.index(max(accs)) + 1
    assert run["stopped_epoch"] == best
    assert run["val_acc"] == max(accs)
    assert run["train_loss"] == run["history"][best - 1]["train_loss"]


def test_early_stopping_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aon_func._experiments import train as train_mod

    argv = ["train", "--method", "es", *TINY, "--epochs", "4", "--lr", "0.3"]
    ref = _run(tmp_path / "ref", *argv)
    real = train_mod.train_run

    def interrupted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if not kwargs["resume"]:

            def stop(epoch: int, record: dict[str, Any]) -> None:
                if epoch == 2:
                    raise KeyboardInterrupt

            kwargs["on_epoch"] = stop
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_run", interrupted)
    out = tmp_path / "cut" / "o"
    assert main([*argv, "--out", str(out)]) == 130
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    new = json.loads((out / "results.json").read_text())

    def strip(r: dict[str, Any]) -> dict[str, Any]:
        r = {k: v for k, v in r.items() if k != "sec_per_epoch"}
        r["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]
        return r

    assert strip(new["methods"]["es"]["runs"][0]) == strip(ref["methods"]["es"]["runs"][0])


@pytest.mark.parametrize(
    ("model", "layers"),
    [
        ("deep-mlp", [f"body.{2 * i}.weight" for i in range(4)]),
        ("deep-cnn", [f"body.{2 * i}.weight" for i in range(4)]),
    ],
)
def test_deep_plain_networks_record_per_layer_condition_and_gradient(
    tmp_path: Path, model: str, layers: list[str]
) -> None:
    argv = [
        "train",
        "--method",
        "aon-1",
        *TINY,
        "--epochs",
        "2",
        "--model",
        model,
        "--depth",
        "5",
        "--width",
        "8",
        "--activation",
        "tanh",
        "--train-size",
        "300",
    ]
    res = _run(tmp_path, *argv)
    run = res["methods"]["aon-1"]["runs"][0]
    assert res["config"]["depth"] == 5
    assert res["config"]["activation"] == "tanh"
    for h in run["history"]:
        assert sorted(h["cond"]) == sorted(layers) == sorted(h["grad_norm"])
        assert all(c is None or c >= 1.0 for c in h["cond"].values())
        assert all(g > 0 for g in h["grad_norm"].values())
    assert sorted(run["ortho_error_per_layer"]) == sorted(layers)


def test_deep_models_are_plain() -> None:
    from aon_func._experiments.models import build_model

    for name, shape in (("deep-mlp", (40,)), ("deep-cnn", (1, 28, 28)), ("deep-cnn", (40,))):
        net = build_model(name, shape, 10, depth=20, activation="relu")
        kinds = {type(m).__name__ for m in net.modules()}
        assert not kinds & {"BatchNorm1d", "BatchNorm2d", "GroupNorm", "LayerNorm"}
        weights = [n for n, p in net.named_parameters() if n.endswith("weight")]
        assert len(weights) == 20
        assert net(torch.randn(2, *shape)).shape == (2, 10)
    with pytest.raises(ValueError, match="--depth 1"):
        build_model("deep-mlp", (40,), 10, depth=1)


# --------------------------------------------------------------------------- approx


def test_approximation_errors_against_the_closed_form() -> None:
    from aon_func._experiments.approx import approximation_errors

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64, generator=g))
    s = torch.tensor([2.0, 1.0, 0.2], dtype=torch.float64)
    w = (u * s) @ v.T  # 5 x 8 with singular values 2, 1, 0.2 and two zeros: use its 3 x 8 rows
    w = u.T @ w  # 3 x 8, singular values exactly 2, 1, 0.2
    sv = torch.linalg.svdvals(w)
    assert torch.allclose(sv, s)
    res = approximation_errors(w, orders=[0, 1, 4])
    assert res["kappa"] == pytest.approx(float(sv[0] / sv[-1]))
    for row in res["orders"]:
        f = aon_func.singular_value_map(sv / sv[0], row["order"])
        assert row["ortho_2"] == pytest.approx(float(1 - f.min() ** 2), abs=1e-8)
        assert row["certified"] == pytest.approx(row["ortho_2"], abs=1e-8)
        assert row["polar_2"] == pytest.approx(float(1 - f.min()), abs=1e-8)


def test_approx_command_on_a_results_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, "compare", *TINY, "--epochs", "1", "--methods", "plain,aon-2")
    folder = tmp_path / "o"
    capsys.readouterr()
    assert (
        main(["approx", str(folder), "--max-order", "3", "--json", str(tmp_path / "a.json")]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("aon-2 (trained as aon-2, seed 0), fc1.weight: condition number ")
    rows = json.loads((tmp_path / "a.json").read_text())
    assert [r["layer"] for r in rows] == ["fc1.weight", "fc2.weight"]
    assert [o["order"] for o in rows[0]["orders"]] == [0, 1, 2, 3]
    errs = [o["ortho_2"] for o in rows[0]["orders"]]
    assert errs == sorted(errs, reverse=True)  # a higher order is closer to orthonormal
    assert main(["approx", str(folder), "--json", str(tmp_path / "a.json")]) == 2
    assert "exists: give a new file" in capsys.readouterr().err
    assert main(["approx", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
