"""Pictures: training curves (``curves.png``), the confusion matrix, and the inspection PNGs
(gradient bars, image and kernel grids, heatmaps over images).

Figures are drawn with matplotlib's object API on an Agg canvas: no window, no pyplot global
state (safe to call every epoch from the trainer, or from a notebook without changing its
backend), and nothing is imported until a function is called. Every PNG is written atomically:
to a temporary file in the same directory, then renamed over the target, so a crash or a full
disk never leaves a half-written picture behind.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnjax.run.workdir import atomic_file

# Above these many classes, the confusion matrix drops per-cell values, then tick labels.
MAX_CELL_VALUES = 30
MAX_TICK_LABELS = 60


def figure(width: float, height: float):
    """A Figure attached to an Agg canvas (files only, independent of pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_atomic(fig, path, dpi: int = 100) -> Path:
    """Writes ``fig`` as a PNG at ``path`` through ``workdir.atomic_file``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:  # a full disk names the picture
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return path


def _series(lines: list[dict], key: str) -> tuple[list, list]:
    """(epochs, values) of the lines that have ``key``, with finite values."""
    points = [(x["epoch"], x[key]) for x in lines if _finite(x.get(key))]
    return [e for e, _ in points], [v for _, v in points]


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def plot_curves(lines: list[dict], path, title: str | None = None, train_targets: str = "") -> Path:
    """Training vs validation loss and accuracy per epoch, side by side (the Keras tutorial's
    plot), as a PNG at ``path``.

    Args:
      lines: ``metrics.jsonl`` lines (``cnnjax.run.metrics.read_lines``): ``epoch`` and any of
        ``train_loss``, ``eval_loss``, ``train_accuracy``, ``eval_accuracy``; a final
        ``test_accuracy`` goes into the title. Missing or non-finite values are skipped.
      path: the PNG to write (replaced atomically).
      title: figure title (default: none, or the test accuracy when known).
      train_targets: how the training loss's targets differ from the validation loss's hard
        labels (e.g. "label smoothing 0.1"), shown in its legend: such a loss is not
        comparable with the validation loss (smoothing alone keeps it above).

    Returns:
      ``path`` as a Path.

    Raises:
      ValueError: no line has an ``epoch``.
    """
    lines = sorted((x for x in lines if "epoch" in x), key=lambda x: x["epoch"])
    if not lines:
        raise ValueError("plot_curves needs at least one metrics line with an 'epoch'")
    fig = figure(11, 4)
    panels = fig.subplots(1, 2)
    for ax, metric in zip(panels, ("loss", "accuracy"), strict=True):
        for split, label in (("train", "Training"), ("eval", "Validation")):
            epochs, values = _series(lines, f"{split}_{metric}")
            if epochs:
                note = f" ({train_targets})" if split == "train" and train_targets else ""
                label = f"{label} {metric}{note}"
                ax.plot(epochs, values, marker="o", markersize=3, label=label)
        ax.set(title=f"Training and Validation {metric.capitalize()}", xlabel="epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.has_data():
            ax.legend(loc="upper right" if metric == "loss" else "lower right")
    test = lines[-1].get("test_accuracy")
    if title is None and _finite(test):
        title = f"test accuracy {test:.4f} after epoch {lines[-1]['epoch']}"
    if title:
        fig.suptitle(title)
    return save_atomic(fig, path)


def plot_confusion_matrix(confusion, class_names, path, normalize: bool = True) -> Path:
    """A confusion-matrix heatmap as a PNG at ``path``.

    Rows are true classes (labelled with their per-class accuracy), columns predictions; the
    title gives the overall accuracy and the number of examples.

    Args:
      confusion: counts (K, K), rows true labels, columns predictions (``evaluate_checkpoint``'s
        ``confusion``; a nested list is fine).
      class_names: K names.
      path: the PNG to write (replaced atomically).
      normalize: show each row as fractions of its true class (else raw counts).

    Returns:
      ``path`` as a Path.

    Raises:
      ValueError: ``confusion`` is not square or does not match ``class_names``.
    """
    counts = np.asarray(confusion, np.float64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion must be ({k}, {k}) for {k} class names; got {counts.shape}")
    row_totals = counts.sum(axis=1)
    per_class = np.diag(counts) / np.maximum(row_totals, 1)
    values = counts / np.maximum(row_totals, 1)[:, None] if normalize else counts
    side = float(np.clip(0.5 * k + 3, 6, 16))  # inches
    fig = figure(side, side * 0.9)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    if k <= MAX_TICK_LABELS:
        rows = [f"{name} ({acc:.2f})" for name, acc in zip(class_names, per_class, strict=True)]
        size = 10 if k <= MAX_CELL_VALUES else 7
        ax.set_xticks(range(k), class_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.tick_params(labelsize=size)
        ax.set_yticks(range(k), rows)
    if k <= MAX_CELL_VALUES:
        _annotate_cells(ax, values, normalize)
    total = counts.sum()
    accuracy = np.trace(counts) / max(total, 1)
    ax.set(xlabel="predicted", ylabel="true (per-class accuracy)")
    ax.set_title(f"Confusion matrix: accuracy {accuracy:.4f} on {int(total)} examples")
    return save_atomic(fig, path)


def _annotate_cells(ax, values: np.ndarray, normalize: bool) -> None:
    """Each cell's value, white on dark cells."""
    # Half of the colour scale (0..1 normalised, 0..max for counts).
    threshold = 0.5 if normalize else values.max() / 2
    fmt = "{:.2f}" if normalize else "{:.0f}"
    fontsize = 9 if len(values) <= 12 else 7
    for (i, j), v in np.ndenumerate(values):
        color = "white" if v > threshold else "black"
        ax.text(j, i, fmt.format(v), ha="center", va="center", color=color, fontsize=fontsize)


MAX_PANELS = 64  # at most this many panels in one save_grid PNG


def plot_gradient_bars(rows: list[dict], path, title: str = "gradient norms") -> None:
    """Horizontal bars of ``grad_norm`` per row, log scale, coloured by kind."""
    from matplotlib.patches import Patch

    colors = {"conv": "tab:blue", "dense": "tab:green", "activation": "tab:orange"}
    fig = figure(7, 1.2 + 0.22 * len(rows))
    ax = fig.subplots()
    y = np.arange(len(rows))
    norms = [max(r["grad_norm"], 1e-30) for r in rows]  # log scale: no zeros
    ax.barh(y, norms, color=[colors[r["kind"]] for r in rows])
    ax.set_yticks(y, [r["layer"] for r in rows], fontsize=7)
    ax.invert_yaxis()  # input at the top
    ax.set_xscale("log")
    ax.set_xlabel("L2 norm of d loss / d (kernel | block output)")
    ax.set_title(title)
    handles = [Patch(color=c, label=kind) for kind, c in colors.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    save_atomic(fig, path, dpi=110)


def save_grid(
    arrays,
    path,
    title: str,
    *,
    ncols: int | None = None,
    labels: Sequence[str] | None = None,
    symmetric: bool = False,
    cmap: str | Sequence[str] = "viridis",
) -> None:
    """A PNG grid of images: each panel (h, w) (colour-mapped) or (h, w, 3) (RGB).

    Args:
      arrays: a sequence of panels (at most ``MAX_PANELS`` are drawn).
      ncols: panels per row (default: a near-square grid).
      labels: a small title per panel.
      symmetric: one colour scale for every panel, centred on zero (red +, blue -), for signed
        weights and gradients; otherwise each panel is scaled to its own range.
      cmap: colour map of the (h, w) panels, or one per panel.
    """
    panels = [np.asarray(a, np.float32) for a in list(arrays)[:MAX_PANELS]]
    vmax = max(float(np.abs(p).max()) for p in panels) or 1.0
    ncols = ncols or math.ceil(math.sqrt(len(panels)))
    fig, axes = panel_grid(len(panels), ncols, 1.3)
    for i, (ax, p) in enumerate(zip(axes, panels, strict=False)):
        if p.ndim == 3:  # RGB: map to [0, 1]
            lo, hi = (-vmax, vmax) if symmetric else (p.min(), p.max())
            ax.imshow(np.clip((p - lo) / max(hi - lo, 1e-12), 0, 1))
        elif symmetric:
            ax.imshow(p, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        else:
            ax.imshow(p, cmap=cmap if isinstance(cmap, str) else cmap[i])
        if labels is not None:
            ax.set_title(labels[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_atomic(fig, path, dpi=110)


def panel_grid(n: int, ncols: int, inches: float):
    """A figure of ``n`` panels, ``ncols`` (at most) per row, each ``inches`` square, with its
    axes in reading order (every axis off: the panels show images)."""
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = figure(inches * ncols, inches * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).flat
    for ax in axes:
        ax.axis("off")
    return fig, list(axes)


def save_overlays(
    images,
    heatmaps,
    path,
    title: str,
    *,
    labels: Sequence[str] | None = None,
    ncols: int | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> None:
    """A PNG grid with one panel per image: its heatmap alpha-blended over it.

    Args:
      images: panels (H, W) grey or (H, W, 3) RGB, each scaled to its own range.
      heatmaps: non-negative maps (H, W), one per image, each drawn over 0..its maximum
        (Grad-CAM maps are already in [0, 1]; gradient magnitudes have any scale).
      labels: a small title per panel (e.g. predicted and true class).
      ncols: panels per row (default: all in one row, at most 8).
      alpha: opacity of the heatmap.
    """
    pairs = list(zip(images, heatmaps, strict=True))[:MAX_PANELS]
    fig, axes = panel_grid(len(pairs), ncols or 8, 1.6)
    for i, (ax, pair) in enumerate(zip(axes, pairs, strict=False)):
        image, heat = (np.asarray(a, np.float32) for a in pair)
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / max(hi - lo, 1e-12)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=float(heat.max()) or 1.0)
        if labels is not None:
            ax.set_title(labels[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_atomic(fig, path, dpi=110)
