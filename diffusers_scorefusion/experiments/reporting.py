"""Writing experiment outputs: results.json, report.md and matplotlib (Agg) figures, every file written atomically."""

import json
import math
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to a temp file next to `path` and renames it over `path` (readers never see a partial file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(staging, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Atomic JSON write (NaN written as null)."""
    atomic_write_bytes(path, (json.dumps(_finite(payload), indent=1) + "\n").encode())


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def mean_and_se(values: Sequence[float]) -> tuple:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(m)``; NaN for one value)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("cannot average an empty list")
    se = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else float("nan")
    return float(array.mean()), se


def _cell(mean: Optional[float], se: Optional[float], digits: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    if se is None or not math.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(rows: List[Dict[str, Any]], methods: Sequence[str], value: str, se: Optional[str],
                   digits: int = 3, best: str = "min") -> str:  # fmt: skip
    """Rows n, columns methods, cells ``value ± se``; the best mean per row in bold (`best`: "min", "max" or "")."""
    ns = sorted({row["n"] for row in rows})
    lookup = {(row["n"], row["method"]): row for row in rows}
    lines = ["| n | " + " | ".join(methods) + " |", "| ---: | " + " | ".join("---:" for _ in methods) + " |"]
    for n in ns:
        cells = [lookup.get((n, method)) for method in methods]
        means = [c[value] if c is not None and c.get(value) is not None else float("nan") for c in cells]
        finite = [m for m in means if math.isfinite(m)]
        target = (min(finite) if best == "min" else max(finite)) if finite and best else None
        texts = []
        for cell, mean in zip(cells, means):
            text = _cell(mean, None if cell is None or se is None else cell.get(se), digits)
            texts.append(f"**{text}**" if target is not None and mean == target else text)
        lines.append(f"| {n} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str) -> None:
    """Saves a matplotlib figure as PNG atomically and closes it."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_metric_vs_n(rows: List[Dict[str, Any]], methods: Sequence[str], value: str, se: str, ylabel: str,
                     title: str, path: str, log_y: bool = False) -> None:  # fmt: skip
    """One line per method: mean ± s.e. against n (log-2 x axis)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    draw_metric_vs_n(axis, rows, methods, value, se, ylabel, title, log_y)
    save_figure(figure, path)


def draw_metric_vs_n(axis: Any, rows: List[Dict[str, Any]], methods: Sequence[str], value: str, se: str, ylabel: str,
                     title: str, log_y: bool = False, colors: Optional[Dict[str, str]] = None) -> None:  # fmt: skip
    """Draws `plot_metric_vs_n`'s lines on a given matplotlib axis (`colors`: a colour per method, optional)."""
    for index, method in enumerate(methods):
        points = sorted((row["n"], row[value], row.get(se)) for row in rows if row["method"] == method)
        if not points:
            continue
        ns, means, ses = zip(*points)
        ses = [0.0 if s is None or not math.isfinite(s) else s for s in ses]
        style = "-" if method in ("scorefusion", "scratch", "finetune") else ":"
        color = (colors or {}).get(method, f"C{index % 10}")
        axis.errorbar(ns, means, yerr=ses, label=method, linestyle=style, marker="o", markersize=3, capsize=2,
                      color=color)  # fmt: skip
    axis.set_xscale("log", base=2)
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel("n (target training samples)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """Tiles `(m, h, w)` images into one `(rows * (h + 1) - 1, columns * (w + 1) - 1)` array with 1-pixel gaps."""
    count, height, width = images.shape
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1), np.nan)
    for i in range(count):
        r, c = divmod(i, columns)
        grid[r * (height + 1) : r * (height + 1) + height, c * (width + 1) : c * (width + 1) + width] = images[i]
    return grid


def plot_image_panels(panels: Dict[str, np.ndarray], columns: int, title: str, path: str, vmax: float) -> None:
    """One image grid per named panel, side by side (grey levels 0..vmax, gaps white)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6), squeeze=False)
    cmap = plt.get_cmap("gray_r").with_extremes(bad="white")
    for axis, (name, images) in zip(axes[0], panels.items()):
        axis.imshow(image_grid(images, columns), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        axis.set_title(name, fontsize=8)
        axis.axis("off")
    figure.suptitle(title, fontsize=9, y=1.06)
    save_figure(figure, path)


def plot_spectrum(images: np.ndarray, labels: Sequence[str], title: str, path: str, vmax: float) -> None:
    """`images` of shape `(num_noises, num_weights, h, w)`: a row per initial noise, a column per weight vector."""
    plt = pyplot()
    rows, cols = images.shape[:2]
    figure, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 0.4, 0.9 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            axes[r][c].imshow(images[r, c], cmap="gray_r", vmin=0, vmax=vmax, interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(labels[c], fontsize=6)
    figure.suptitle(title, fontsize=8)
    save_figure(figure, path)
