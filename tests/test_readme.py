"""README.md's two set-up commands and .ci/run must agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def _commands() -> tuple[str, str]:
    readme = (ROOT / "README.md").read_text()
    main = readme.split("**Main job**", 1)[1]
    tests = readme.split("**Tests**", 1)[1]
    return _bash_blocks(main)[0], _bash_blocks(tests)[0]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    _, test_cmd = _commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), (
        f"README test command not found verbatim in .ci/run:\n{test_cmd}"
    )


def test_setup_installs_torch_only_when_absent() -> None:
    # A bare ``pip install torch`` (or an unpinned range) would pull a multi-GB
    # CUDA build on a machine without torch; an installed torch must be kept.
    for cmd in _commands():
        assert cmd.startswith(
            '(python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0) && '
        )
        assert cmd.count("torch") == 2


def test_main_job_runs_compare() -> None:
    main_cmd, _ = _commands()
    assert main_cmd.endswith("aon-func compare")
    assert "[experiments]" in main_cmd


def test_readme_python_examples_run() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
