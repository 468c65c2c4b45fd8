"""Smoke tests of ``aon-func bench`` (tiny config; no timing is ever asserted)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from aon_func._bench import _models
from aon_func._bench._suite import roofline_products
from aon_func._cli import main
from aon_func._layout import layout_of


def test_quick_bench_writes_every_section(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    printed, errors = capfd.readouterr()
    for heading in ("calls ", "apply ", "neighbours ", "memory ", "step "):
        assert heading in printed
    # The profiler's C++ start/stop lines go to file descriptor 2 unless silenced.
    assert "profiler_start" not in errors
    assert errors.strip() == ""
    res = json.loads(out.read_text())
    cpu = res["devices"]["cpu"]
    assert cpu["machine"]["torch_num_threads"] == torch.get_num_threads()
    assert "parallel_info" in cpu["machine"]
    rows = cpu["apply"]["tiny"]["rows"]
    assert set(rows) == {"apply auto", "apply vmap", "apply loop", "kernel loop", "roofline"}
    for row in rows.values():
        for mode in ("fwd", "fwd+bwd"):
            assert row[mode]["ms"] > 0
            assert row[mode]["over_roofline"] > 0
    assert cpu["apply"]["tiny"]["auto"] in rows
    assert cpu["apply"]["tiny"]["plan"].startswith("1 call: 4 x 32x32")
    assert cpu["apply"]["tiny"]["calls"]["fwd"]["aten_calls"] > 0
    assert cpu["apply"]["tiny"]["calls"]["fwd"]["kernels"] is None  # no CUDA here
    calls = cpu["calls"]["tiny"]
    assert calls["device"] == "meta"
    assert 0 < calls["fwd"]["aten_calls"] < calls["fwd+bwd"]["aten_calls"]
    neighbours = cpu["neighbours"]["tiny"]["rows"]
    assert {"polar (SVD)", "torch spectral_norm", "torch orthogonal"} <= set(neighbours)
    memory = cpu["memory"]["tiny"]["rows"]
    assert all(r["over_params"] > 0 for r in memory.values())
    assert cpu["step"]["tiny"]["overhead"] > 0


def test_geotorch_absent_is_skipped_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_geotorch(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "geotorch":
            raise ImportError("no geotorch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_geotorch)
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--device", "cpu", "--sections", "neighbours", "--json", str(out)]
    assert main(argv) == 0
    skipped = json.loads(out.read_text())["devices"]["cpu"]["neighbours"]["tiny"]["skipped"]
    assert "geotorch" in skipped["geotorch orthogonal"]


def test_unknown_model_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--models", "resnet1000"])
    assert exc.value.code == 2


@pytest.mark.parametrize("name", sorted(_models.MODELS))
def test_models_build_with_weights(name: str) -> None:
    if name in ("resnet50", "vit_s16", "gpt2", "llama1b"):
        with torch.device("meta"):
            module = _models.MODELS[name].build()
    else:
        module = _models.MODELS[name].build()
    assert any(n.endswith("weight") for n, _ in module.named_parameters())


def test_resnet18_cifar_runs_on_32x32() -> None:
    net = _models.resnet18_cifar()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(11.17e6, rel=0.01)


def test_roofline_products_count_the_kernel_products() -> None:
    # two 64 x 576 matrices (one group) and one 10 x 512: K = 3
    layouts = {
        "a": layout_of((64, 64, 3, 3), 0),
        "b": layout_of((64, 64, 3, 3), 0),
        "c": layout_of((10, 512), 0),
    }
    fwd = roofline_products(layouts, 3, backward=False)
    assert len(fwd) == 2 * (1 + 2 + 1)
    assert fwd[0] == ((2, 64, 576), (2, 576, 64))
    both = roofline_products(layouts, 3, backward=True)
    # backward: one product for the Gram, two for each other product
    assert len(both) == len(fwd) + 2 * (1 + 2 * 3)


def test_transformer_shape_sets_have_the_documented_matrices() -> None:
    with torch.device("meta"):
        gpt2, llama = _models.gpt2_small(), _models.llama_1b()
    shapes = [tuple(p.shape) for p in gpt2.parameters()]
    assert len(shapes) == 48
    assert {s[::-1] for s in shapes} == {(768, 2304), (768, 768), (768, 3072), (3072, 768)}
    shapes = [tuple(p.shape) for p in llama.parameters()]
    assert len(shapes) == 112
    assert sum(p.numel() for p in llama.parameters()) == pytest.approx(0.97e9, rel=0.02)
    assert max(shapes) == (8192, 2048)


def test_precision_and_compile_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """``--dtype bfloat16 --tf32 --compile tiny --compile-steps``: recorded, run, and restored.

    Inductor takes a minute per graph on a small CPU, so ``torch.compile`` is
    pointed at ``aot_eager`` here (the same capture and autograd graphs).
    """
    real_compile = torch.compile
    modes: list[object] = []

    def compile_aot_eager(fn: Any, *, mode: object = None, **kwargs: Any) -> Any:
        modes.append(mode)
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--device", "cpu", "--sections", "apply,memory,step"]
    argv += ["--dtype", "bfloat16", "--tf32", "--compile", "tiny", "--compile-steps"]
    assert main([*argv, "--json", str(out)]) == 0
    assert torch.backends.cuda.matmul.allow_tf32 == tf32_before  # restored
    printed, _ = capfd.readouterr()
    assert "products in bf16" in printed
    res = json.loads(out.read_text())
    assert res["config"]["matmul_dtype"] == "torch.bfloat16"
    assert res["config"]["tf32"] is True
    assert res["config"]["compile_steps"] is True
    cpu = res["devices"]["cpu"]
    assert cpu["compile_modes"] == ["default"]  # CUDA graphs need CUDA
    assert modes == [None, None, None]  # apply, and the plain and AON steps: the default mode
    apply = cpu["apply"]["tiny"]
    assert apply["matmul_dtype"] == "torch.bfloat16"
    assert "compiled" in apply["rows"]
    assert apply["compile_failed"] == {}
    assert apply["compile_s_by_row"]["compiled"] > 0
    assert apply["compile_s"] == apply["compile_s_by_row"]["compiled"]
    step = cpu["step"]["tiny"]
    assert step["autocast_bf16"] is True
    assert step["compile_failed"] == {}
    compiled = step["compiled"]["compiled"]
    assert compiled["overhead"] > 0
    assert compiled["compile_s"] > 0
    assert all(r["over_params"] > 0 for r in cpu["memory"]["tiny"]["rows"].values())
