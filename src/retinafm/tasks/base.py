"""What every task type shares: the rule that picks the best epoch, masked losses, and the hooks
through which the rest of the toolkit asks a task type what only it knows (how its targets are
read, which settings it takes, its report headline and error rows, its linear probe).

A task is a frozen dataclass holding its output names plus whatever it learns from data (target
statistics from train, thresholds from validation); `state()` is what the checkpoint keeps so
`predict` rebuilds the identical task from the file alone. What a task type knows before it has
outputs (its settings, its manifest reader) is on the class, so callers ask `get_task(name)`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd
import torch

from retinafm.data.sources import CLASS_LABELS, DataSourceError, TargetReader
from retinafm.settings import ConfigError
from retinafm.tasks.report_cells import ErrorRows

C_GRID = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)  # logistic regression: inverse regularisation strength


class ExplainCase(NamedTuple):
    """An image report.html explains: its path as the predictions CSV has it, the output whose
    heatmap to draw (a class, a label or a target), and whether it is an "error" or a "correct" case."""

    path: str
    target: str
    case: str


@dataclass(frozen=True)
class TaskSetting:
    """A fine-tuning setting only one task type takes: set for another task, it is refused with `message`."""

    is_set: Callable[[Any], bool]
    message: str


class TaskBase:
    """Defaults shared by the task dataclasses (which define `output_names` and `name`)."""

    name: str = ""
    output_names: tuple[str, ...] = ()
    selection_metric: str = "auroc_macro"

    # How a manifest (or a folder of class folders) holds this task's targets.
    targets: ClassVar[TargetReader] = CLASS_LABELS
    # One class per image (softmax outputs): the outputs are exclusive classes, possibly graded.
    one_class_per_image: ClassVar[bool] = False
    # The outputs are manifest columns named by a setting (--labels, --targets), not class names.
    named_columns: ClassVar[bool] = False
    # Settings naming this task's manifest columns, checked before the manifest is required.
    column_settings: ClassVar[tuple[TaskSetting, ...]] = ()
    # Other settings only this task type takes.
    own_settings: ClassVar[tuple[TaskSetting, ...]] = ()
    # report.html: the headline metrics in order (the first, minus "macro", prefixes the per-output
    # metrics), what one output is called, and a metric only this task writes, which tells its
    # metrics files apart when they carry no task block (None: the default task).
    report_headline: ClassVar[tuple[str, ...]] = ()
    output_kind: ClassVar[str] = "output"
    # What an explained output's number is on report.html's heatmap cards.
    explained_value: ClassVar[str] = "probability"
    legacy_marker: ClassVar[str | None] = None
    # The linear probe: its regularisation grid (strongest first) and the name of that setting.
    probe_grid: ClassVar[tuple[float, ...]] = C_GRID
    probe_strength_name: ClassVar[str] = "C"
    probe_columns_help: ClassVar[str] = ""  # the setting naming a probe's columns, when named_columns

    # ----------------------------------------------------------------------- settings
    @classmethod
    def from_settings(cls, settings: Any, output_names: Sequence[str]) -> TaskBase:
        """A new run's task from FinetuneSettings (before fit/calibrate)."""
        return cls(tuple(output_names))  # type: ignore[call-arg]

    @classmethod
    def check_settings(cls, settings: Any, others: Iterable[type[TaskBase]] = ()) -> None:
        """Refuse FinetuneSettings this task type cannot use: settings of the `others` task types, and
        a data folder where the targets live in a manifest's columns."""
        others = [o for o in others if o is not cls]
        for other in others:
            for rule in other.column_settings:
                if rule.is_set(settings):
                    raise ConfigError(rule.message)
        if (not cls.targets.from_folders or any(r.is_set(settings) for r in cls.column_settings)) \
                and not settings.manifest:
            raise ConfigError(f"--task {settings.task} reads its labels or targets from a CSV: "
                              "give --manifest FILE.csv")
        for other in others:
            for rule in other.own_settings:
                if rule.is_set(settings):
                    raise ConfigError(rule.message)
        cls.check_own_settings(settings)

    @classmethod
    def check_own_settings(cls, settings: Any) -> None:
        """Check the values of the settings this task type takes (nothing by default)."""

    @classmethod
    def search_space(cls, trial: Any, settings: Any) -> dict[str, Any]:
        """`tune`: this task type's own settings worth searching (an optuna trial suggests them)."""
        return {}

    def absent_outputs(self, targets: np.ndarray) -> list[str]:
        """The outputs a labelled set has no known example of (their metrics are undefined there)."""
        known = ~np.isnan(targets)
        return [name for i, name in enumerate(self.output_names) if not known[:, i].any()]

    # ----------------------------------------------------------------------- report
    @staticmethod
    def error_rows(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], limit: int) -> ErrorRows:
        """report.html's worst errors from a predictions CSV read as text."""
        return [], [], "No error rows for this task type."

    @staticmethod
    def explain_cases(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], n_errors: int = 8,
                      n_correct: int = 8, seed: int = 0) -> list[ExplainCase]:
        """report.html's heatmaps: up to `n_errors` of the most confident errors, then up to
        `n_correct` correct cases, from a predictions CSV (as text or as written); rows whose truth is
        unknown are never chosen; the same `seed` gives the same cases. None for this task type."""
        return []

    # ----------------------------------------------------------------------- compare
    def roc_curves(self, targets: np.ndarray, outputs_a: np.ndarray, outputs_b: np.ndarray):
        """(name, 0/1 truth, scores of A, scores of B) for every ROC curve behind the task's AUROCs."""
        return iter(())

    # ----------------------------------------------------------------------- linear probe
    @classmethod
    def probe_targets(cls, frame: pd.DataFrame, splits: dict[str, np.ndarray], settings: Any
                      ) -> tuple[TaskBase, dict[str, np.ndarray], np.ndarray]:
        """(task before fit, {split: rows}, targets) from an embeddings table's columns."""
        raise NotImplementedError(f"the {cls.name} task has no linear probe")

    def probe_folds(self, y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Train/held-out rows choosing the probe's regularisation when there is no validation split."""
        from sklearn.model_selection import KFold

        n = len(y)
        return list(KFold(min(folds, n), shuffle=True, random_state=seed).split(np.zeros(n)))

    def fit_probe(self, z: np.ndarray, y: np.ndarray, strength: float, max_iter: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(weight (outputs, dim), bias) of the task's linear model on standardised features."""
        raise NotImplementedError(f"the {self.name} task has no linear probe")

    def knn_outputs(self, x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
        """kNN on cosine distance: the task's outputs for `x` from its neighbours in the training rows."""
        raise NotImplementedError(f"the {self.name} task has no kNN probe")

    def probe_summary(self, split: str, targets: np.ndarray) -> dict[str, Any]:
        """One row of the probe's data_summary.csv."""
        return {"split": split, "images": len(targets)}

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.output_names

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    def state(self) -> dict[str, Any]:
        """Everything but the output names, as plain types, for the checkpoint's task_state."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name not in ("output_names", "name")}

    def fit(self, train_targets: np.ndarray) -> TaskBase:
        """The task with what it learns from the training targets (nothing by default)."""
        return self

    def calibrate(self, targets: np.ndarray, outputs: np.ndarray) -> TaskBase:
        """The task with what it chooses on validation outputs (nothing by default)."""
        return self

    def bootstrap_strata(self, targets: np.ndarray) -> np.ndarray | None:
        """What bootstrap replicates are stratified on (None: plain resampling)."""
        return None

    # (label, metric key, format) printed after training and evaluation, most important first.
    summary_fields: tuple[tuple[str, str, str], ...] = ()

    def summary(self, metrics: dict[str, float], ci: dict[str, tuple[float, float]] | None = None) -> str:
        """One line of the headline metrics, each with its 95% CI when `ci` has one."""
        parts = []
        for label, key, fmt in self.summary_fields:
            if key not in metrics:
                continue
            text = f"{label} {metrics[key]:{fmt}}"
            low, high = (ci or {}).get(key, (float("nan"), float("nan")))
            if not (np.isnan(low) or np.isnan(high)):
                text += f" ({low:{fmt}}–{high:{fmt}})"
            parts.append(text)
        return "  ".join(parts)

    def is_better(self, metrics: dict[str, float], loss: float, best: dict[str, float] | None,
                  best_loss: float) -> bool:
        """Higher selection metric wins; ties (and epochs where it is undefined) go to the lower loss."""
        if best is None:
            return True
        score = metrics.get(self.selection_metric, float("nan"))
        best_score = best.get(self.selection_metric, float("nan"))
        if np.isnan(best_score) and not np.isnan(score):
            return True
        if np.isnan(score):
            return bool(np.isnan(best_score) and loss < best_loss)
        return score > best_score or (score == best_score and loss < best_loss)


def masked_mean(per_element: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the known entries; zero (still attached to the graph) when none are known."""
    mask = mask.to(per_element.dtype)
    return (per_element * mask).sum() / mask.sum().clamp_min(1.0)


class VectorTargetTask(TaskBase):
    """Tasks whose target is one float per output (0/1 labels or values), NaN where unknown."""

    # Fields holding one float per output; checkpoints give them back as lists.
    per_output_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.per_output_fields:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    def target_array(self, samples: Sequence[Any]) -> np.ndarray:
        """(N, outputs) float array of the samples' targets, NaN where unknown."""
        rows = [s.targets if s.targets is not None else (np.nan,) * self.num_outputs for s in samples]
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), self.num_outputs)

    def dataset_targets(self, samples: Sequence[Any]) -> list:
        return [tuple(row) for row in self.target_array(samples)]

    named_columns: ClassVar[bool] = True
    # What a probe's target columns must hold, for its message (None: any number).
    probe_allowed: ClassVar[tuple[float, ...] | None] = None

    @classmethod
    def probe_targets(cls, frame: pd.DataFrame, splits: dict[str, np.ndarray], settings: Any
                      ) -> tuple[TaskBase, dict[str, np.ndarray], np.ndarray]:
        columns = [c.strip() for c in settings.columns.split(",") if c.strip()]
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataSourceError(f"the embeddings have no column(s) {missing}; columns: {', '.join(frame.columns)}")
        try:
            targets = frame[columns].apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float64)
        except (ValueError, TypeError):
            raise DataSourceError(f"columns {columns} must hold numbers (empty for unknown)") from None
        cls.check_probe_values(columns, targets)
        return cls.for_probe(columns, settings), splits, targets

    @classmethod
    def check_probe_values(cls, columns: list[str], targets: np.ndarray) -> None:
        """Refuse values this task's columns cannot hold (any number by default)."""

    @classmethod
    def for_probe(cls, columns: Sequence[str], settings: Any) -> TaskBase:
        return cls(tuple(columns))  # type: ignore[call-arg]

    def fit_probe(self, z: np.ndarray, y: np.ndarray, strength: float, max_iter: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
        weights, biases = [], []
        for j in range(self.num_outputs):
            known = ~np.isnan(y[:, j])
            weight, bias = self.fit_probe_output(j, z[known], y[known, j], strength, max_iter, seed)
            weights.append(weight)
            biases.append(bias)
        return np.vstack(weights), np.asarray(biases)

    def fit_probe_output(self, j: int, z: np.ndarray, y: np.ndarray, strength: float, max_iter: int,
                         seed: int) -> tuple[np.ndarray, float]:
        """(weight, bias) of output `j`'s linear model, fitted on the rows where it is known."""
        raise NotImplementedError(f"the {self.name} task has no linear probe")

    def knn_outputs(self, x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
        out = np.zeros((len(x), self.num_outputs))
        for j in range(self.num_outputs):
            known = ~np.isnan(y_train[:, j])
            out[:, j] = self.knn_output(x_train[known], y_train[known, j], x, min(k, int(known.sum())))
        return out

    def knn_output(self, x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
        """Output `j` for `x` from its `k` nearest training rows among those where it is known."""
        raise NotImplementedError(f"the {self.name} task has no kNN probe")

    def probe_summary(self, split: str, targets: np.ndarray) -> dict[str, Any]:
        return {"split": split, "images": len(targets),
                **{f"known_{n}": int((~np.isnan(targets[:, j])).sum()) for j, n in enumerate(self.output_names)}}


    @staticmethod
    def columns_of(frame: Any, columns: Sequence[str]) -> np.ndarray:
        """These CSV columns as an (N, len(columns)) float array, empty cells as NaN."""
        require_columns(frame, columns)
        return frame[list(columns)].astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)


def sample_in_order(count: int, size: int, seed: int) -> np.ndarray:
    """`size` of the indices 0..count-1 drawn without replacement with `seed`, in increasing order
    (all of them when there are no more): the same cases on every report of one run."""
    if size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max(0, size), replace=False))


def known_text(column: pd.Series) -> np.ndarray:
    """Cells of a predictions CSV column holding something (not NaN, not empty): read as text, an
    unknown label is an empty string; read as written, NaN."""
    return (~column.isna() & (column.astype(str).str.strip() != "")).to_numpy()


def numbers(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A predictions CSV column as floats, NaN where it holds no number."""
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)


def require_columns(frame: Any, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"the predictions have no column(s) {missing}; they have {', '.join(map(str, frame.columns))}")


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list, np.ndarray)):
        return [float(v) if isinstance(v, (float, np.floating)) else v for v in value]
    return value


def logistic_probe(z: np.ndarray, y: np.ndarray, strength: float, max_iter: int, seed: int) -> Any:
    """scikit-learn's logistic regression at inverse regularisation `strength`, fitted."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=strength, max_iter=max_iter, random_state=seed).fit(z, y)


def logit(p: float) -> float:
    return math.log(p / (1 - p))
