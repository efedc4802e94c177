"""Multi-class (and binary) classification: softmax head, cross-entropy, AUROC-selected."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy

from retinafm.data.sources import ClassLabels, DataSourceError
from retinafm.stats.metrics import confusion, grade_order_of, multiclass_metrics
from retinafm.tasks.base import (
    ExplainCase,
    TaskBase,
    TaskSetting,
    known_text,
    logistic_probe,
    numbers,
    require_columns,
    sample_in_order,
)
from retinafm.tasks.report_cells import ErrorRows, fmt, number_cell, prob


@dataclass(frozen=True)
class MulticlassTask(TaskBase):
    output_names: tuple[str, ...]
    name: str = "multiclass"
    # Best epoch: highest validation macro AUROC (binary: the positive class's); ties go to the lower loss.
    selection_metric: str = "auroc_macro"
    # Ordered grades (e.g. DR 0-4): class indices from the lowest grade to the highest; None: nominal.
    grade_order: tuple[int, ...] | None = None

    summary_fields = (("AUROC", "auroc_macro", ".4f"), ("accuracy", "accuracy", ".4f"), ("F1", "f1_macro", ".4f"),
                      ("quadratic kappa", "quadratic_kappa", ".4f"), ("kappa", "kappa", ".4f"), ("MCC", "mcc", ".4f"))
    targets = ClassLabels("multiclass")
    own_settings = (
        TaskSetting(lambda s: s.ordinal, "--ordinal applies to --task multiclass (graded classes such as DR 0-4)"),
        TaskSetting(lambda s: s.mixup > 0 or s.cutmix > 0, "--mixup/--cutmix apply to --task multiclass only"),
    )
    report_headline = ("auroc_macro", "auprc_macro", "accuracy", "balanced_accuracy", "f1_macro", "sensitivity_macro",
                       "specificity_macro", "kappa", "quadratic_kappa", "mcc", "ece")
    output_kind = "class"
    one_class_per_image = True

    def __post_init__(self) -> None:
        if self.grade_order is not None:  # checkpoints give it back as a list
            object.__setattr__(self, "grade_order", tuple(int(i) for i in self.grade_order))

    @property
    def ordinal(self) -> bool:
        return self.grade_order is not None

    @classmethod
    def from_settings(cls, settings: Any, output_names: Sequence[str]) -> MulticlassTask:
        return cls(tuple(output_names), grade_order=grade_order(output_names, settings.ordinal))

    def bootstrap_strata(self, targets: np.ndarray) -> np.ndarray:
        """Resample within each class, so every replicate keeps the class counts."""
        return np.asarray(targets)

    def absent_outputs(self, targets: np.ndarray) -> list[str]:
        present = set(np.asarray(targets).tolist())
        return [name for i, name in enumerate(self.output_names) if i not in present]

    def target_array(self, samples: Sequence) -> np.ndarray:
        return np.array([s.label for s in samples], dtype=np.int64)

    def dataset_targets(self, samples: Sequence) -> list:
        return [s.label for s in samples]

    def train_loss(self, smoothing: float = 0.0, soft_targets: bool = False) -> nn.Module:
        # With mixup/cutmix the targets arrive already mixed and smoothed.
        return SoftTargetCrossEntropy() if soft_targets else nn.CrossEntropyLoss(label_smoothing=smoothing)

    def loss(self, logits: torch.Tensor, targets: np.ndarray) -> float:
        return float(nn.functional.cross_entropy(logits.float(), torch.as_tensor(targets, dtype=torch.long)))

    def activate(self, logits: torch.Tensor) -> np.ndarray:
        return torch.softmax(logits.float(), dim=1).numpy()

    def explained_outputs(self, probs: np.ndarray) -> list[list[int]]:
        """What `--target predicted` explains per image: the predicted class."""
        return [[int(i)] for i in probs.argmax(axis=1)]

    def metrics(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        return multiclass_metrics(targets, probs, self.output_names, self.grade_order)

    def predicted_labels(self, probs: np.ndarray) -> list[str]:
        return [self.output_names[i] for i in probs.argmax(axis=1)]

    def prediction_frame(self, paths: Sequence[str], probs: np.ndarray,
                         targets: np.ndarray | None = None) -> pd.DataFrame:
        """path, prediction, [label], then one prob_<class> per class (rows sum to 1)."""
        frame = pd.DataFrame({"path": list(paths), "prediction": self.predicted_labels(probs)})
        if targets is not None:
            frame["label"] = [self.output_names[int(t)] for t in targets]
        for i, name in enumerate(self.output_names):
            frame[f"prob_{name}"] = probs[:, i]
        return frame

    def from_prediction_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(targets, probabilities) back from an evaluation's predictions CSV (`label`, prob_<class>)."""
        require_columns(frame, ["label", *(f"prob_{n}" for n in self.output_names)])
        index = {name: i for i, name in enumerate(self.output_names)}
        unknown = sorted(set(frame["label"].astype(str)) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the classes {list(self.output_names)}")
        targets = np.array([index[str(v)] for v in frame["label"]], dtype=np.int64)
        return targets, frame[[f"prob_{n}" for n in self.output_names]].to_numpy(dtype=np.float64)

    def plots(self, targets: np.ndarray, probs: np.ndarray, folder: Path) -> dict[str, Path]:
        # matplotlib loads only when a plot is drawn: predict and embed never pay its ~0.7 s import.
        from retinafm.plots import (
            plot_calibration,
            plot_confusion_matrix,
            plot_pr,
            plot_roc,
        )

        cm = confusion(targets, probs.argmax(axis=1), self.num_outputs)
        # Top-label reliability: is the model right as often as its confidence says?
        correct = (probs.argmax(axis=1) == np.asarray(targets)).astype(float)
        return {
            "confusion_matrix": plot_confusion_matrix(cm, self.output_names, folder / "confusion_matrix.png"),
            "confusion_matrix_normalized": plot_confusion_matrix(
                cm, self.output_names, folder / "confusion_matrix_normalized.png", normalize=True),
            "roc": plot_roc(targets, probs, self.output_names, folder / "roc.png"),
            "pr": plot_pr(targets, probs, self.output_names, folder / "pr.png"),
            "calibration": plot_calibration([("top label", correct, probs.max(axis=1))], folder / "calibration.png"),
        }

    @staticmethod
    def error_rows(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], limit: int) -> ErrorRows:
        """The misclassified images, most confidently wrong first."""
        wrong = frame[frame["prediction"].astype(str) != frame["label"].astype(str)].copy()
        wrong["_p"] = [prob(row, row["prediction"]) for _, row in wrong.iterrows()]
        wrong["_p_true"] = [prob(row, row["label"]) for _, row in wrong.iterrows()]
        shown = wrong.sort_values("_p", ascending=False, kind="stable").head(limit)
        headers = [{"name": "true"}, {"name": "predicted"}, {"name": "p(predicted)", "num": True},
                   {"name": "p(true)", "num": True}]
        rows = [(str(r["path"]), [{"text": str(r["label"])}, {"text": str(r["prediction"])},
                                  number_cell(fmt("p", r["_p"])), number_cell(fmt("p", r["_p_true"]))])
                for _, r in shown.iterrows()]
        note = (f"{len(wrong)} of {len(frame)} images misclassified; the {len(shown)} with the highest probability "
                "for the wrong class are shown." if len(wrong) else f"No misclassified images among {len(frame)}.")
        return headers, rows, note

    @staticmethod
    def explain_cases(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], n_errors: int = 8,
                      n_correct: int = 8, seed: int = 0) -> list[ExplainCase]:
        """Errors: the misclassified images, highest probability for the wrong class first; correct: a
        seeded sample of the rightly classified. The heatmap is always the predicted class's: what
        made the model say what it said."""
        require_columns(frame, ["path", "prediction", "label"])
        predicted = frame["prediction"].astype(str).to_numpy()
        label = frame["label"].astype(str).to_numpy()
        # A class the model does not have (a hand-edited CSV) has no output to explain.
        usable = known_text(frame["label"]) & known_text(frame["prediction"]) & np.isin(predicted, list(outputs))
        confidence = np.full(len(frame), np.nan)
        for name in outputs:
            if f"prob_{name}" in frame.columns:
                chosen = predicted == name
                confidence[chosen] = numbers(frame, f"prob_{name}")[chosen]
        wrong = np.flatnonzero(usable & (predicted != label))
        # Most confident first; NaN probabilities last; ties keep the CSV's order (a stable sort).
        wrong = wrong[np.argsort(-np.nan_to_num(confidence[wrong], nan=-np.inf), kind="stable")][:max(0, n_errors)]
        right = np.flatnonzero(usable & (predicted == label))
        right = right[sample_in_order(len(right), n_correct, seed)]
        paths = frame["path"].astype(str).to_numpy()
        return ([ExplainCase(paths[i], predicted[i], "error") for i in wrong]
                + [ExplainCase(paths[i], predicted[i], "correct") for i in right])

    def roc_curves(self, targets: np.ndarray, outputs_a: np.ndarray, outputs_b: np.ndarray):
        # Binary tasks: the positive class's curve is the headline AUROC; the negative class's mirrors it.
        classes = [1] if self.num_outputs == 2 else range(self.num_outputs)
        for c in classes:
            yield self.output_names[c], (targets == c).astype(int), outputs_a[:, c], outputs_b[:, c]

    @classmethod
    def probe_targets(cls, frame: pd.DataFrame, splits: dict[str, np.ndarray], settings: Any
                      ) -> tuple[MulticlassTask, dict[str, np.ndarray], np.ndarray]:
        """Class names from the train rows' labels (settings.label_column); rows without one are left out."""
        if settings.label_column not in frame.columns:
            raise DataSourceError(f"the embeddings have no {settings.label_column!r} column (--label-column); "
                                  f"columns: {', '.join(frame.columns)}")
        labels = frame[settings.label_column].astype("string")
        names = sorted(labels.iloc[splits["train"]].dropna().unique().tolist())
        if len(names) < 2:
            raise DataSourceError(f"the train rows have {len(names)} class(es) in {settings.label_column!r}; "
                                  "a classifier needs at least two")
        extra = sorted(set(labels.dropna()) - set(names))
        if extra:
            raise DataSourceError(f"label(s) {extra} appear outside the train split but not in it; the probe "
                                  "cannot learn them")
        index = {n: i for i, n in enumerate(names)}
        targets = np.array([index.get(v, -1) if not pd.isna(v) else -1 for v in labels], dtype=np.int64)
        splits = {s: rows[targets[rows] >= 0] for s, rows in splits.items()}
        return cls(tuple(names)), splits, targets

    def probe_folds(self, y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        from sklearn.model_selection import StratifiedKFold

        smallest = int(np.bincount(y).min())
        k = min(folds, smallest)
        if k < 2:
            raise DataSourceError("without a validation split the probe chooses its regularisation by k-fold on train, "
                                  "which needs at least 2 training images of every class; add a val split")
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))

    def fit_probe(self, z: np.ndarray, y: np.ndarray, strength: float, max_iter: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Multinomial logistic regression."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            model = logistic_probe(z, y, strength, max_iter, seed)
        weight, bias = model.coef_, model.intercept_
        if weight.shape[0] == 1:  # binary: one logit; as two softmax outputs with the same odds
            weight = np.vstack([-weight[0] / 2, weight[0] / 2])
            bias = np.array([-bias[0] / 2, bias[0] / 2])
        return weight, bias

    def knn_outputs(self, x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
        from sklearn.neighbors import KNeighborsClassifier

        model = KNeighborsClassifier(n_neighbors=min(k, len(y_train)), metric="cosine").fit(x_train, y_train)
        probs = np.zeros((len(x), self.num_outputs))
        probs[:, model.classes_] = model.predict_proba(x)
        return probs

    def probe_summary(self, split: str, targets: np.ndarray) -> dict[str, Any]:
        counts = np.bincount(targets, minlength=self.num_outputs)
        return {"split": split, **dict(zip(self.output_names, counts.tolist(), strict=True))}


def grade_order(class_names: Sequence[str], ordinal: bool) -> tuple[int, ...] | None:
    """Classes named as numbered grades are ordered by their numbers; `ordinal` (--ordinal) also
    marks other names as grades, in their class order. None: nominal classes."""
    order = grade_order_of(class_names)
    if order is None and ordinal and len(class_names) > 2:
        order = list(range(len(class_names)))
    return tuple(order) if order is not None else None
