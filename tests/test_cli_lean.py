"""The base install: ``import aon_func``, ``aon-func --help`` and ``--version`` with torch alone.

The extras' modules are blocked in a fresh interpreter (a ``sys.meta_path``
finder that raises ``ModuleNotFoundError`` for them, as if they were not
installed); the apps then say which extra to install, in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aon_func
from aon_func._cli import main, plain_text
from aon_func._experiments.cli import EXTRA_MODULES

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = sorted({*EXTRA_MODULES, "geotorch"})

# Runs each argv through main() in one interpreter with BLOCKED unimportable,
# and prints [{"argv", "code", "out", "err"}, ...] and the blocked modules that
# were imported anyway.
SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys

    BLOCKED = set(json.loads(sys.argv[1]))

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import aon_func
    from aon_func._cli import main

    results = []
    for argv in json.loads(sys.argv[2]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
        results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps({"version": aon_func.__version__, "results": results, "leaked": leaked}))
    """
)

ARGVS = [
    ["--help"],
    ["--version"],
    ["compare", "--help"],
    ["train", "--help"],
    ["bench", "--help"],
    ["compare", "--epochs", "1"],
    ["train", "--method", "sn", "--epochs", "1"],
]


@pytest.fixture(scope="module")
def torch_alone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    cwd = tmp_path_factory.mktemp("lean")  # a run that got through would write runs/ here
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(BLOCKED), json.dumps(ARGVS)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    assert not (cwd / "runs").exists()
    return report


def _result(report: dict[str, object], argv: list[str]) -> dict[str, object]:
    results = report["results"]
    assert isinstance(results, list)
    return next(r for r in results if r["argv"] == argv)


def test_import_and_help_need_torch_alone(torch_alone: dict[str, object]) -> None:
    assert torch_alone["version"] == aon_func.__version__
    assert torch_alone["leaked"] == []
    for argv in (["--help"], ["compare", "--help"], ["train", "--help"], ["bench", "--help"]):
        r = _result(torch_alone, argv)
        assert r["code"] == 0, r
        assert "usage: aon-func" in str(r["out"])
        assert "Traceback" not in str(r["err"])
    top = str(_result(torch_alone, ["--help"])["out"])
    for command in ("compare", "train", "bench", "--version"):
        assert command in top


def test_version_with_torch_alone(torch_alone: dict[str, object]) -> None:
    r = _result(torch_alone, ["--version"])
    assert r["code"] == 0
    assert r["out"] == f"aon-func {aon_func.__version__}\n"


@pytest.mark.parametrize(
    "argv", [["compare", "--epochs", "1"], ["train", "--method", "sn", "--epochs", "1"]]
)
def test_an_app_without_its_extra_names_the_extra(
    torch_alone: dict[str, object], argv: list[str]
) -> None:
    r = _result(torch_alone, argv)
    assert r["code"] not in (0, None)
    err = str(r["err"])
    lines = [line for line in err.splitlines() if line.startswith("aon-func")]
    assert lines == [
        f"aon-func: error: {argv[0]} needs the experiments extra "
        "(numpy, tqdm, matplotlib, scikit-learn, mnist1d not installed): "
        'pip install "aon-func[experiments]"'
    ]
    assert "Traceback" not in err


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"aon-func {aon_func.__version__}\n"


@pytest.mark.parametrize("command", [[], ["compare"], ["train"], ["bench"]])
def test_help_has_no_rest_markup(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: aon-func")
    assert "``" not in out
    assert ":func:`" not in out
    assert ":class:`" not in out


def test_plain_text() -> None:
    assert plain_text("see ``docs/performance.md`` and :func:`aon_func.aon`") == (
        "see docs/performance.md and aon_func.aon"
    )


def test_no_demo_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo"])
    assert exc.value.code == 2
    assert "invalid choice: 'demo'" in capsys.readouterr().err


@pytest.mark.parametrize("app", ["_experiments", "_bench"])
def test_the_apps_use_only_the_public_api(app: str) -> None:
    """Every ``aon_func`` import of an app names a public name (``aon_func.__all__``).

    Besides its own modules, an app may import the model zoo (``aon_func._zoo``),
    which the two apps share and the library itself does not use.
    """
    import ast

    folder = ROOT / "aon_func" / app
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                if module in ("..", "aon_func"):
                    for alias in node.names:
                        assert alias.name in aon_func.__all__, (path.name, alias.name)
                else:
                    inside = node.level == 1 or module.startswith(f"aon_func.{app}")
                    zoo = module in (".._zoo", "aon_func._zoo")
                    assert inside or zoo or not module.startswith(("aon_func", ".")), (
                        path.name,
                        module,
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("aon_func._"), (path.name, alias.name)


def test_the_library_does_not_import_the_zoo_or_the_apps() -> None:
    import ast

    for path in sorted((ROOT / "aon_func").glob("*.py")):
        if path.name == "_cli.py":  # the command line registers the apps, lazily
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert not module.startswith(("._zoo", "._bench", "._experiments")), path.name


def test_the_package_version_is_the_project_version() -> None:
    import re

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version = "([^"]+)"$', text, flags=re.MULTILINE)
    assert match is not None
    assert match.group(1) == aon_func.__version__
