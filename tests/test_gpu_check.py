"""``scripts/gpu_check.sh`` and ``scripts/gpu_summary.py`` on a machine without CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _summary_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gpu_summary", ROOT / "scripts" / "gpu_summary.py"
    )
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA is available: this checks the script's no-CUDA path"
)
def test_gpu_check_skips_the_cuda_parts_and_exits_0_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "GPU_CHECK_BUDGET": "60", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        cwd=tmp_path,  # the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "CUDA is not available" in summary
    assert "skipping the CUDA tests" in summary
    assert (out / "env.log").is_file()
    assert not (out / "tests-cuda.log").exists()  # no CUDA part ran
    targets = (out / "targets.txt").read_text()
    assert "not measured" in targets


def _fake_bench() -> dict[str, Any]:
    """A CUDA bench JSON with three figures: one met, one missed, a failed compile."""

    def row(fwd: float) -> dict[str, Any]:
        return {
            "fwd": {"ms": 1.0, "over_roofline": fwd},
            "fwd+bwd": {"ms": 2.0, "over_roofline": 2.2},
        }

    cuda = {
        "machine": {"cuda_device": "Fake GPU", "torch": "2.x", "cuda_version": "13"},
        "apply": {
            "resnet50": {
                "rows": {"apply auto": row(1.7), "kernel loop": {"fwd": {"ms": 2.5}}},
                "calls": {"fwd": {"aten_calls": 400, "kernels": 210}},
                "compile_failed": {"compiled reduce-overhead": "RuntimeError: boom"},
            }
        },
        "memory": {"mlp": {"rows": {"K=2 auto": {"over_params": 5.5}}}},
    }
    return {"devices": {"cuda": cuda}}


def test_summary_reads_the_bench_json_against_the_targets(tmp_path: Path) -> None:
    path = tmp_path / "bench-cuda.json"
    path.write_text(json.dumps(_fake_bench()))
    mod = _summary_module()
    out = tmp_path / "targets.txt"
    assert (
        mod.main(["--eager", str(path), "--tf32", str(tmp_path / "absent.json"), "--out", str(out)])
        == 0
    )
    text = out.read_text()
    lines = {line[6:66].strip(): line for line in text.splitlines()}
    assert "Fake GPU" in text.splitlines()[0]
    assert lines["apply fwd / roofline, ResNet-50"].rstrip().endswith("met")  # 1.70 <= 2
    assert "1.70" in lines["apply fwd / roofline, ResNet-50"]
    assert lines["apply fwd+bwd / roofline, ResNet-50"].rstrip().endswith("met")  # 2.2 <= 2.5
    assert (
        lines["apply (batched) x faster than per-layer loop, ResNet-50"].rstrip().endswith("MISSED")
    )  # 2.5 / 1.0 < 3
    assert lines["CUDA kernels per apply fwd, ResNet-50"].rstrip().endswith("MISSED")  # 210 > 150
    assert lines["peak extra memory / weights, K=2, MLP"].rstrip().endswith("met")
    assert lines["same with TF32"].rstrip().endswith("not measured")  # no TF32 run
    assert "compiled reduce-overhead failed: RuntimeError: boom" in text
    _, tally = mod.summarise({"eager": _fake_bench()})
    assert tally == {"met": 3, "MISSED": 2, "not measured": len(mod.ROWS) - 5}
