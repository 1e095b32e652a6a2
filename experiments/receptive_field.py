"""Empirical receptive fields vs the formula r_l = r_{l-1} + (k_l - 1) d_l prod_{i<l} s_i.

For each stack, the empirical field is the non-zero region of d(centre output pixel, summed
over channels) / d input, from `jax.grad` through `cnnjax.nn.ops` layers with random positive
weights. Prints a table, writes the gradient maps to OUT/receptive_field.png and exits
non-zero if any stack disagrees with the formula.

    python experiments/receptive_field.py [--out experiments/out]
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: write a PNG, never open a window
import matplotlib.pyplot as plt  # noqa: E402

from cnnjax.nn.ops.receptive import (  # noqa: E402
    centre_gradient_map,
    random_stack,
    stack_receptive_field,
    support_extent,
)

# Layers are (kind, kernel, stride, dilation); every layer uses SAME padding.
STACKS = {
    "3x conv3": [("conv", 3, 1, 1)] * 3,
    "conv3-s2 + 2x conv3": [("conv", 3, 2, 1), ("conv", 3, 1, 1), ("conv", 3, 1, 1)],
    "conv3 + max2 + conv3 + max2 + conv3": [
        ("conv", 3, 1, 1),
        ("max", 2, 2, 1),
        ("conv", 3, 1, 1),
        ("max", 2, 2, 1),
        ("conv", 3, 1, 1),
    ],
    "conv3 + avg3-s2 + conv3": [("conv", 3, 1, 1), ("avg", 3, 2, 1), ("conv", 3, 1, 1)],
    "dilated conv3 d=1,2,4": [("conv", 3, 1, 1), ("conv", 3, 1, 2), ("conv", 3, 1, 4)],
    "stem: conv7-s2 + max3-s2 + 2x conv3": [
        ("conv", 7, 2, 1),
        ("max", 3, 2, 1),
        ("conv", 3, 1, 1),
        ("conv", 3, 1, 1),
    ],
}
# 16 random inputs: max pooling sends gradient to one winner per window, so the map is the
# union over inputs. 64x64 keeps the largest field (27) well clear of the border.
INPUT_SHAPE = (16, 64, 64, 2)


def measure(stacks: dict, seed: int) -> list[dict]:
    """Formula and empirical receptive field, plus the gradient map, of every stack."""
    rows = []
    for name, layers in stacks.items():
        grad_map = centre_gradient_map(random_stack(layers, seed=seed), INPUT_SHAPE, seed=seed)
        rf = stack_receptive_field(layers)
        empirical = support_extent(grad_map)
        rows.append(
            dict(
                name=name,
                formula=rf,
                empirical=empirical,
                map=grad_map,
                match=empirical == (rf, rf),
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'stack':<{width}}  formula RF  empirical RF  match"]
    for r in rows:
        emp = "x".join(map(str, r["empirical"]))
        lines.append(
            f"{r['name']:<{width}}  {r['formula']:>10}  {emp:>12}  {'yes' if r['match'] else 'NO'}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, crop: int = 40) -> None:
    """|gradient| per stack (square-rooted so faint edges show), central crop x crop pixels."""
    fig, axes = plt.subplots(2, -(-len(rows) // 2), figsize=(10, 7))
    for ax, r in zip(axes.flat, rows, strict=False):
        h, w = r["map"].shape
        top, left = (h - crop) // 2, (w - crop) // 2
        ax.imshow(r["map"][top : top + crop, left : left + crop] ** 0.5, cmap="magma")
        ax.set_title(
            f"{r['name']}\nformula {r['formula']}, empirical {r['empirical'][0]}", fontsize=9
        )
        ax.set_axis_off()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "out", help="output dir"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    args = parser.parse_args(argv)
    rows = measure(STACKS, args.seed)
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out / "receptive_field.png")
    print(f"wrote {args.out / 'receptive_field.png'}")
    return 0 if all(r["match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
