"""The aon-func command line: compare, train, approx, jacobian, report, bench.

Importing this module imports nothing beyond the standard library; main()
imports the apps' argument parsers, which need only torch. What an app needs
beyond torch (the experiments and bench extras) is imported when it runs, so
that aon-func --help and --version work with the base install.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

__all__ = ["main", "plain_text"]

DESCRIPTION = (
    "Approximated orthonormal normalisation (AON) of weights on torch.func: "
    "the comparison experiments (compare, train; approx, jacobian and report on their "
    "results folders) and the performance suite (bench). "
    "aon-func COMMAND --help lists a command's options."
)

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """Help text from a reST docstring: ``literal`` and :role:`name` become plain words."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Rewrite the description, epilog and option help of ``parser`` and its sub-commands."""
    for attr in ("description", "epilog"):
        text = getattr(parser, attr)
        if text:
            setattr(parser, attr, plain_text(text))
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = plain_text(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if isinstance(choice.help, str):
                    choice.help = plain_text(choice.help)
            for sub in action.choices.values():
                _plain_help(sub)


def build_parser() -> argparse.ArgumentParser:
    """The ``aon-func`` parser with every sub-command registered."""
    from . import __version__
    from ._bench import register as register_bench
    from ._experiments.cli import register as register_experiments

    parser = argparse.ArgumentParser(prog="aon-func", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_experiments(sub)
    register_bench(sub)
    _plain_help(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aon-func`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
