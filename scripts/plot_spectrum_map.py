"""Plot AON's spectrum map ``f_K(s) = s * sum_{j<=K} c_j (1 - s^2)^j`` for K = 0..8.

Writes ``docs/img/spectrum_map.png`` (or ``--out``). Left: ``f_K`` on
``[0, 1]`` (``s`` is a singular value divided by the largest). Right: the
certified orthogonality error ``1 - f_K(1/kappa)^2`` against the condition
number ``kappa``.

Usage::

    python scripts/plot_spectrum_map.py [--out docs/img/spectrum_map.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from aon_func import certified_error, singular_value_map

ORDERS = range(9)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "spectrum_map.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    s = torch.linspace(0, 1, 501, dtype=torch.float64)
    kappa = torch.logspace(0, 3, 301, dtype=torch.float64)
    cmap = plt.get_cmap("viridis")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    for order in ORDERS:
        color = cmap(order / (len(ORDERS) - 1))
        ax.plot(s, torch.as_tensor(singular_value_map(s, order)), color=color, label=f"K = {order}")
        bx.plot(
            kappa, torch.as_tensor(certified_error(kappa, order)), color=color, label=f"K = {order}"
        )
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("s = s_i / s_max of W")
    ax.set_ylabel("singular value of h(W)")
    ax.set_title("AON spectrum map f_K(s)  (K = 0: spectral normalisation)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    bx.set_xscale("log")
    bx.set_xlabel("condition number kappa of W")
    bx.set_ylabel("||h h^T - I||_2 = 1 - f_K(1/kappa)^2")
    bx.set_title("certified orthogonality error")
    bx.set_ylim(0, 1.02)
    bx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, metadata={"Software": None})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
