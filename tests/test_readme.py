"""README.md's commands (the main job, the quick and the full tests) and .ci/run must agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


GUARD = '(python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0) && '
INSTALL = 'python -m pip install -e ".[test,dev,experiments]" && '


def _commands() -> tuple[str, str, str]:
    """README's main-job command and its two test commands: quick, then full."""
    readme = (ROOT / "README.md").read_text()
    main = readme.split("**Main job**", 1)[1]
    tests = _bash_blocks(readme.split("**Tests**", 1)[1])
    return _bash_blocks(main)[0], tests[0], tests[1]


def test_ci_runs_the_readme_full_test_command_verbatim() -> None:
    _, _, full = _commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert full in ci.splitlines(), (
        f"README full test command not found verbatim in .ci/run:\n{full}"
    )
    assert full == GUARD + INSTALL + "python -m pytest"


def test_quick_test_command_leaves_out_the_slow_tests() -> None:
    _, quick, full = _commands()
    assert quick == GUARD + INSTALL + 'python -m pytest -m "not slow"'
    assert quick != full
    ci = (ROOT / ".ci" / "run").read_text()
    assert quick not in ci.splitlines()  # CI runs the full suite
    markers = (ROOT / "pyproject.toml").read_text()
    assert '"slow: ' in markers  # the marker the quick command filters on is declared


def test_setup_installs_torch_only_when_absent() -> None:
    # A bare ``pip install torch`` (or an unpinned range) would pull a multi-GB
    # CUDA build on a machine without torch; an installed torch must be kept.
    for cmd in _commands():
        assert cmd.startswith(GUARD)
        assert cmd.count("torch") == 2


def test_main_job_runs_compare() -> None:
    main_cmd, _, _ = _commands()
    assert main_cmd.endswith("aon-func compare")
    assert "[experiments]" in main_cmd


def test_readme_python_examples_run() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    assert 'exclude=["2.weight"]' in blocks[0]  # the first example is the recommended setup
    assert "add_gains(params, init=2**0.5)" in blocks[0]
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
