"""Figures people would rather see than read: confusion matrices, ROC and PR (with their macro
averages), reliability diagrams, regression scatter, training curves, forest plots of model
comparisons.

Each function saves one PNG atomically (temporary file in the same folder, then rename), closes
its figure and returns the path.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from retinafm.files import atomic_path
from retinafm.stats.calibration import calibration_bins, expected_calibration_error
from retinafm.stats.metrics import _known, _missing_outcome, regression_metrics

# Text in our figures is data (class names, column names, file names), never TeX: a class named "$x",
# "a$b$" or "\\frac" would otherwise be parsed as mathtext, and a parse error fails the figure (and
# the report after training). Set at import, for every figure this module draws.
matplotlib.rcParams["text.parse_math"] = False

DPI = 120
# Validation metrics drawn in the training-curves figure, in this order, when the log has them.
CURVE_METRICS = {"val_auroc_macro": "AUROC (macro)", "val_accuracy": "accuracy", "val_kappa": "kappa",
                 "val_r2_macro": "R² (macro)", "val_pearson_macro": "Pearson r (macro)"}
# R² of a barely trained regressor can be -100 or worse; a scale reaching that far would flatten
# every other curve, so values below this floor are marked at the floor instead.
CURVE_FLOOR = -1.0


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: Path, normalize: bool = False) -> Path:
    """Annotated heatmap of `cm` (rows: true, columns: predicted); `normalize` shows row fractions."""
    cm = np.asarray(cm, dtype=float)
    shown = _row_fractions(cm) if normalize else cm
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.1 * n + 3, 1.0 * n + 2.5))
    vmax = 1.0 if normalize else max(float(shown.max(initial=0)), 1.0)
    im = _draw_matrix(ax, shown, _cell_texts(shown, ".2f") if normalize else _cell_texts(cm, ".0f"), vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xlabel="Predicted", ylabel="True", title="Confusion matrix" + (" (row-normalised)" if normalize else ""))
    ax.set_xticklabels(class_names, rotation=30, ha="right")
    ax.set_yticklabels(class_names)
    return _save(fig, path)


def plot_multilabel_confusion(cms: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """One annotated 2x2 matrix per label (rows: true, columns: predicted; negative, positive) in
    one figure, shaded by row fraction so rare findings stay readable, annotated with counts."""
    cms = np.asarray(cms, dtype=float)
    if cms.shape != (len(names), 2, 2):
        raise ValueError(f"need one 2x2 matrix per label, shape ({len(names)}, 2, 2); got {cms.shape}")
    fig, axes = _panels(len(names), width=2.7, height=2.6)
    for ax, name, cm in zip(axes, names, cms, strict=True):
        _draw_matrix(ax, _row_fractions(cm), _cell_texts(cm, ".0f"), 1.0)
        ax.set_xticklabels(["neg", "pos"])
        ax.set_yticklabels(["neg", "pos"])
        ax.set(title=name, xlabel="Predicted", ylabel="True")
    fig.suptitle("Confusion matrix per label (shade: row fraction)")
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """One-vs-rest ROC curve per class with its AUC, their macro average (see `macro_roc`) and the
    chance line; binary: the positive class's curve only."""
    return _roc_figure(_one_vs_rest(y_true, probs, class_names), "ROC (one vs rest)", path)


def plot_pr(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """One-vs-rest precision–recall curve per class with its average precision and their macro
    average (see `macro_pr`); binary: the positive class's curve only."""
    return _pr_figure(_one_vs_rest(y_true, probs, class_names), "Precision–recall (one vs rest)", path)


def plot_multilabel_roc(targets: np.ndarray, probs: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """ROC curve per label over its known rows (0/1 targets, NaN unknown) with its AUC, the macro
    average over the labels with a defined curve, and the chance line."""
    return _roc_figure(_per_label(targets, probs, names), "ROC (per label)", path)


def plot_multilabel_pr(targets: np.ndarray, probs: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Precision–recall curve per label over its known rows with its average precision, and the
    macro average over the labels with a defined curve."""
    return _pr_figure(_per_label(targets, probs, names), "Precision–recall (per label)", path)


def plot_calibration(outcomes: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path, n_bins: int = 10) -> Path:
    """Reliability diagram: per (name, outcome 0/1 with NaN unknown, predicted probability), the
    observed frequency against the mean predicted probability in each non-empty equal-width bin,
    with its ECE in the legend and the diagonal of perfect calibration; underneath, histograms of
    the predicted probabilities (known rows)."""
    curves = []  # binned before any figure exists, so bad input leaves no open figure behind
    for name, outcome, prob in outcomes:
        outcome = np.asarray(outcome, dtype=float).reshape(-1)
        prob = np.asarray(prob, dtype=float).reshape(-1)
        curves.append((name, calibration_bins(outcome, prob, n_bins), expected_calibration_error(outcome, prob, n_bins),
                       prob[~np.isnan(outcome)]))
    fig, (ax, hist_ax) = plt.subplots(2, 1, figsize=(5.5, 6.4), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
    for name, (mean, frequency, count), ece, known_prob in curves:
        if not count.sum():
            ax.plot([], [], " ", label=f"{name}: no rows with a known outcome")
            continue
        filled = count > 0
        (line,) = ax.plot(mean[filled], frequency[filled], marker="o", ms=4, label=f"{name} (ECE {ece:.3f})")
        hist_ax.hist(known_prob, bins=np.linspace(0.0, 1.0, n_bins + 1), histtype="step", lw=1.5,
                     color=line.get_color())
    ax.set(ylabel="Observed frequency", title="Calibration (reliability)", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist_ax.set(xlabel="Mean predicted probability", ylabel="count", xlim=(0, 1))
    hist_ax.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    hist_ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_forest(rows: Sequence[dict], path: Path, *, metric: str, reference: str) -> Path:
    """Forest plot of model comparisons: per row (`label`, `difference`, `ci_low`, `ci_high`,
    `p_value`) the difference as a point with its CI whisker, top to bottom in the given order,
    a line at no difference, and the difference, CI and p-value written at the right."""
    n = len(rows)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(n, 1)))
    ys = np.arange(n)[::-1]  # first row on top
    finite = [0.0]
    for y, row in zip(ys, rows, strict=True):
        diff, low, high = (_float(row.get(k)) for k in ("difference", "ci_low", "ci_high"))
        if math.isnan(diff):
            ax.text(0, y, "n/a", ha="center", va="center", fontsize=9, color="grey",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            continue
        has_ci = not (math.isnan(low) or math.isnan(high))
        xerr = [[diff - low], [high - diff]] if has_ci else None
        ax.errorbar(diff, y, xerr=xerr, fmt="s", color="tab:blue", ecolor="tab:blue", capsize=4, ms=6, lw=1.6)
        finite += [diff, *([low, high] if has_ci else [])]
    ax.axvline(0, color="grey", lw=1, ls="--")
    lo, hi = min(finite), max(finite)
    pad = 0.08 * (hi - lo) or 0.05
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(-0.7, max(n, 1) - 0.3)
    ax.set_yticks(ys, [str(r.get("label", "")) for r in rows])
    ax.set_xlabel(f"difference in {metric} (vs {reference})")
    ax.grid(axis="x", alpha=0.3)
    # Text columns right of the axes: x in axes fraction, y in data units.
    right = ax.get_yaxis_transform()
    ax.text(1.02, max(n, 1) - 0.3, "difference (95% CI)", transform=right, ha="left", va="bottom",
            fontsize=9, weight="bold")
    ax.text(1.33, max(n, 1) - 0.3, "p", transform=right, ha="left", va="bottom", fontsize=9, weight="bold")
    for y, row in zip(ys, rows, strict=True):
        ax.text(1.02, y, _difference_text(row), transform=right, ha="left", va="center", fontsize=9)
        ax.text(1.33, y, _p_text(_float(row.get("p_value"))), transform=right, ha="left", va="center", fontsize=9)
    if not n:
        ax.text(0.5, 0.5, "no comparisons", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_title(f"{metric}: difference from {reference}")
    return _save(fig, path)


def _difference_text(row: dict) -> str:
    diff, low, high = (_float(row.get(k)) for k in ("difference", "ci_low", "ci_high"))
    if math.isnan(diff):
        return "n/a"
    if math.isnan(low) or math.isnan(high):
        return f"{diff:+.3f}"
    return f"{diff:+.3f} ({low:+.3f}, {high:+.3f})"


def _p_text(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_regression_scatter(targets: np.ndarray, preds: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """One panel per target: predicted against true value over its known rows, the identity line,
    and R², MAE and n in the title."""
    targets, preds = np.asarray(targets, dtype=float), np.asarray(preds, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined metrics were already reported with the metrics
        metrics = regression_metrics(targets, preds, names)
    fig, axes = _panels(len(names), width=3.6, height=3.6)
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        y, p = _known(targets, preds, i)
        ax.scatter(y, p, s=10, alpha=0.5, edgecolors="none")
        lo, hi = (min(y.min(), p.min()), max(y.max(), p.max())) if len(y) else (0.0, 1.0)
        pad = 0.05 * (hi - lo) or 0.5  # a single point (or all equal) still gets a visible range
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], "--", color="grey", lw=1, label="identity")
        ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="true", ylabel="predicted", aspect="equal",
               title=f"{name}\nR² {_number(metrics[f'r2_{name}'], '.3f')}  "
                     f"MAE {_number(metrics[f'mae_{name}'], '.3g')}  n={len(y)}")
        if not len(y):
            ax.text(0.5, 0.5, "no known values", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(log: pd.DataFrame, path: Path) -> Path:
    """Three panels from a run's log (`epoch` 0-based, `lr`, `train_loss`, `val_loss`, `val_*`):
    losses, the validation metrics of CURVE_METRICS that are present (values below CURVE_FLOOR are
    marked at the floor) and learning rate, per epoch."""
    epochs = log["epoch"].to_numpy() + 1
    marker = "o" if len(log) < 30 else None
    fig, (loss_ax, metric_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.8), sharex=True)

    for column, label in (("train_loss", "train"), ("val_loss", "validation")):
        if column in log:
            loss_ax.plot(epochs, log[column], marker=marker, label=label)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")

    shown = [c for c in CURVE_METRICS if c in log]
    off_scale = 0
    for column in shown:
        values = log[column].to_numpy(dtype=float)
        (line,) = metric_ax.plot(epochs, values, marker=marker, label=CURVE_METRICS[column])
        below = values < CURVE_FLOOR
        if below.any():
            metric_ax.plot(epochs[below], np.full(below.sum(), CURVE_FLOOR), "v", color=line.get_color())
            off_scale += int(below.sum())
    if off_scale:
        metric_ax.plot([], [], "v", color="grey",
                       label=f"{off_scale} value{'s' if off_scale > 1 else ''} below {CURVE_FLOOR:g}, drawn at it")
    # Kappa and R² can go below 0; otherwise keep the familiar 0–1 scale.
    lowest = float(np.nanmin(log[shown].to_numpy(dtype=float), initial=0.0)) if shown else 0.0
    bottom = max(min(0.0, lowest), CURVE_FLOOR) - (0.06 if off_scale else 0.02)  # room for the whole ▼
    metric_ax.set(title="Validation", xlabel="epoch", ylim=(bottom, 1.02))
    if not shown:
        metric_ax.text(0.5, 0.5, "no validation metrics logged", ha="center", va="center",
                       transform=metric_ax.transAxes, color="grey")

    if "lr" in log:
        lr_ax.plot(epochs, log["lr"], marker=marker)
    lr_ax.set(title="Learning rate", xlabel="epoch", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    for ax in (loss_ax, metric_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # matplotlib's ±5% margin around one point leaves no integer tick
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


Outcomes = Iterable[tuple[str, np.ndarray, np.ndarray]]  # (name, positive (bool), scores) per curve
MACRO_STYLE = {"linestyle": "--", "linewidth": 2.5, "color": "black"}


def _roc_figure(outcomes: Outcomes, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    curves = []
    for name, positive, scores in _defined(ax, outcomes):
        fpr, tpr, _ = roc_curve(positive, scores)
        curves.append((fpr, tpr))
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, scores):.3f})")
    if len(curves) > 1:  # one curve (binary, one label) is its own average
        fpr, tpr, area = macro_roc(curves)
        ax.plot(fpr, tpr, **MACRO_STYLE, label=f"macro (AUC {area:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    ax.set(xlabel="False positive rate (1 − specificity)", ylabel="True positive rate (sensitivity)",
           title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _pr_figure(outcomes: Outcomes, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    curves = []
    for name, positive, scores in _defined(ax, outcomes):
        precision, recall, _ = precision_recall_curve(positive, scores)
        curves.append((recall, precision))
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(positive, scores):.3f})")
    if len(curves) > 1:
        recall, precision, ap = macro_pr(curves)
        # AP is the area under this step function, so the macro curve is drawn as steps too.
        ax.plot(recall, precision, drawstyle="steps-pre", **MACRO_STYLE, label=f"macro (AP {ap:.3f})")
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def macro_roc(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, float]:
    """Macro-average ROC curve of per-class curves (fpr, tpr) as roc_curve returns them.

    The common grid is the union of the classes' FPRs; at each grid FPR every class contributes
    both its TPR before and after a vertical jump there, so the mean curve is exact and its area
    equals the mean of the per-class AUCs (sklearn's macro one-vs-rest AUROC). Returns
    (fpr, tpr, area); fpr repeats each grid point twice (before and after the jump).
    """
    if not curves:
        raise ValueError("macro_roc needs at least one curve")
    grid = np.unique(np.concatenate([np.asarray(fpr, dtype=float) for fpr, _ in curves]))
    before = np.mean([_limit(fpr, tpr, grid, "left") for fpr, tpr in curves], axis=0)
    after = np.mean([_limit(fpr, tpr, grid, "right") for fpr, tpr in curves], axis=0)
    fpr = np.repeat(grid, 2)
    tpr = np.column_stack([before, after]).ravel()
    return fpr, tpr, float(auc(fpr, tpr))


def macro_pr(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, float]:
    """Macro-average precision–recall curve of per-class curves (recall, precision) as
    precision_recall_curve returns them (recall decreasing).

    On the common recall grid (the union of the classes' recalls) each class's precision is the
    step function average precision integrates (the precision where the recall first reaches that
    value), so the area under the mean curve, drawn as steps, is the mean of the per-class APs.
    Returns (recall ascending, precision, mean AP).
    """
    if not curves:
        raise ValueError("macro_pr needs at least one curve")
    grid = np.unique(np.concatenate([np.asarray(recall, dtype=float) for recall, _ in curves]))
    steps = []
    for recall, precision in curves:
        recall, precision = np.asarray(recall, dtype=float)[::-1], np.asarray(precision, dtype=float)[::-1]
        # For the recall interval (r_prev, r], AP uses the precision at r's first (ascending) point.
        steps.append(precision[np.minimum(np.searchsorted(recall, grid, side="left"), len(recall) - 1)])
    precision = np.mean(steps, axis=0)
    return grid, precision, float(np.sum(np.diff(grid) * precision[1:]))


def _limit(x: np.ndarray, y: np.ndarray, grid: np.ndarray, side: str) -> np.ndarray:
    """The piecewise-linear curve through (x, y) (x non-decreasing, vertical jumps allowed) at each
    grid point, approached from the left (value before a jump) or the right (after it)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    # left: first point at or after g; right: last point at or before g.
    at = np.searchsorted(x, grid, side="left") if side == "left" else np.searchsorted(x, grid, side="right") - 1
    at = np.clip(at, 0, len(x) - 1)
    exact = x[at] == grid
    # Grid points between two of this curve's points lie on the segment joining them.
    hi = np.clip(np.searchsorted(x, grid, side="right"), 1, len(x) - 1)
    lo = hi - 1
    span = x[hi] - x[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = y[lo] + (y[hi] - y[lo]) * np.where(span > 0, (grid - x[lo]) / span, 0.0)
    return np.where(exact, y[at], inside)


def _one_vs_rest(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Outcomes:
    """Per class (binary: the positive class only), one vs rest."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    return [(class_names[c], y_true == c, probs[:, c])
            for c in ([1] if len(class_names) == 2 else range(len(class_names)))]


def _per_label(targets: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> Outcomes:
    """Per label, over the rows where its target is known."""
    targets, probs = np.asarray(targets, dtype=float), np.asarray(probs, dtype=float)
    if targets.shape != probs.shape or probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"targets {targets.shape} and probs {probs.shape} must both be (N, {len(names)})")
    outcomes = []
    for i, name in enumerate(names):
        y, p = _known(targets, probs, i)
        outcomes.append((name, y == 1, p))
    return outcomes


def _defined(ax: plt.Axes, outcomes: Outcomes) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """The outcomes whose curve is defined in this set; each other one gets a legend entry saying
    why instead of a curve."""
    for name, positive, scores in outcomes:
        missing = _missing_outcome(positive)
        if missing:
            ax.plot([], [], " ", label=f"{name}: {missing}, no curve")
        else:
            yield name, positive, scores


def _panels(count: int, width: float, height: float, max_columns: int = 4) -> tuple[plt.Figure, list[plt.Axes]]:
    """A grid of `count` panels of about width x height inches, spare grid cells hidden."""
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _draw_matrix(ax: plt.Axes, shade: np.ndarray, texts: list[list[str]], vmax: float) -> plt.AxesImage:
    """Square heatmap of `shade` with each cell's text in a colour readable on its background."""
    n = len(shade)
    im = ax.imshow(shade, cmap="Blues", vmin=0, vmax=vmax)
    ax.set(xticks=range(n), yticks=range(n))
    for i in range(n):
        for j in range(n):
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=9,
                    color="white" if shade[i, j] > vmax / 2 else "black")
    return im


def _cell_texts(values: np.ndarray, fmt: str) -> list[list[str]]:
    return [[format(v, fmt) for v in row] for row in values]


def _row_fractions(cm: np.ndarray) -> np.ndarray:
    return cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)


def _number(value: float, fmt: str) -> str:
    return "n/a" if math.isnan(value) else format(value, fmt)


def plot_probe_grid(grid: pd.DataFrame, metric: str, path: Path) -> Path:
    """A linear probe's validation score over its regularisation grid (first column of `grid`)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(grid.iloc[:, 0], grid[metric], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel(grid.columns[0] + (" (inverse regularisation)" if grid.columns[0] == "C" else " (regularisation)"))
    ax.set_ylabel(f"{metric} ({grid['scheme'].iloc[0]})")
    ax.set_title("Linear probe: choice of regularisation")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_label_efficiency(summary: pd.DataFrame, metric: str, label: str, path: Path) -> Path:
    """Test metric (mean +- sd over seeds) against the number of training images, log x axis."""
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(summary["n_train"], summary["mean"], yerr=summary["sd"], marker="o", capsize=4,
                label=label)
    ax.set_xscale("log")
    ax.set_xticks(summary["n_train"].tolist())
    ax.set_xticklabels([f"{n:.0f}" for n in summary["n_train"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training images (log scale)")
    ax.set_ylabel(f"test {metric} (mean ± sd over seeds)")
    seeds = int(summary["seeds"].max()) if len(summary) else 0
    ax.set_title(f"Label efficiency ({seeds} seed{'s' if seeds != 1 else ''} per point)")
    for _, row in summary.iterrows():
        if not math.isnan(row["mean"]):
            ax.annotate(f"{row['fraction']:.0%}", (row["n_train"], row["mean"]), textcoords="offset points",
                        xytext=(6, -10), ha="left", fontsize=8, color="0.35")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_reconstructions(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, *,
                         title: str = "") -> Path:
    """MAE reconstructions: one row per image of (original, masked input, reconstruction with
    the visible patches pasted back), each an (H, W, 3) array in [0, 1]."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows) + 0.4), squeeze=False)
    for r, images in enumerate(rows):
        for c, (image, name) in enumerate(zip(images, ("original", "masked", "reconstruction + visible"), strict=True)):
            axes[r, c].imshow(np.clip(image, 0, 1), interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
