"""The ``aon-func`` command line: ``demo``, ``compare``, ``train``, ``bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._bench import register as register_bench
from ._experiments.cli import register as register_experiments

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from ._kernel import aon
    from ._reference import certified_error, orthogonality_error

    gen = torch.Generator().manual_seed(args.seed)
    w = torch.randn(256, 512, generator=gen)
    s = torch.linalg.svdvals(w)
    kappa = float(s.max() / s.min())
    print(
        f"random 256x512 weight: singular values [{s.min():.3f}, {s.max():.3f}], kappa = {kappa:.2f}"
    )
    print(
        f"{'K':>3} {'s_min(h)':>9} {'s_max(h)':>9} {'||hh^T-I||_F':>13} {'||hh^T-I||_2':>13} {'certified':>10}"
    )
    for order in (0, 1, 2, 4, 8):
        h, _ = aon(w, order=order, n_power_iterations=200)
        sh = torch.linalg.svdvals(h)
        spec = float((1 - sh.min() ** 2).abs().max(((sh.max() ** 2) - 1).abs()))
        print(
            f"{order:>3} {sh.min():>9.4f} {sh.max():>9.4f} {float(orthogonality_error(h)):>13.4f} "
            f"{spec:>13.4f} {float(certified_error(kappa, order)):>10.4f}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aon-func`` console script."""
    parser = argparse.ArgumentParser(prog="aon-func", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="spectrum of h(W) for a random weight and K = 0, 1, 2, 4, 8")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    register_experiments(sub)
    register_bench(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
