"""Settings of the smaller verbs: split, compare, import (their options are generated from these), and probe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from retinafm.settings.base import BOOTSTRAP, SEED, ConfigError, Settings, check_ratios, setting

ImportSource = Literal["retfound"]


@dataclass
class SplitSettings(Settings):
    """A patient-grouped, stratified, seeded split of a manifest, or a leakage check of its split."""

    manifest: str = setting("", "CSV: path, a patient id column [, label | 0/1 label columns | targets] [, split].",
                            path={"dir_okay": False}, required=True)
    out: str | None = setting(None, "Manifest CSV to write with its split column; with --check, an optional CSV "
                                       "of the leaking ids.", path={"dir_okay": False})
    by: str = setting("patient_id", "Column whose rows stay in one split (the patient id); 'none' splits image by "
                                    "image.")
    ratios: str = setting("0.7,0.15,0.15", "train,val,test fractions of the patients.")
    seed: int = setting(0, "Seed of the split.", **SEED)
    stratify: str | None = setting(None, "Column to stratify on (default: label; else each row's rarest positive "
                                            "0/1 label column; 'none': no stratification). Numeric columns with many "
                                            "values go by quintile.")
    check: bool = setting(False, "Don't split: list the ids whose images lie in more than one split of the "
                                 "manifest's split column; exit 1 if there are any, 0 when clean.")
    resplit: bool = setting(False, "Replace the split column the manifest already has.")
    overwrite: bool = setting(False, "Replace an existing --out.")

    @property
    def group_by(self) -> str | None:
        """--by as a column name, or None for 'none' (image by image)."""
        return None if self.by.strip().lower() == "none" else self.by.strip()

    def validate(self) -> None:
        self.check_values()
        if not self.manifest:
            raise ConfigError("--manifest is required: the CSV to split or check.")
        if self.check:
            if self.group_by is None:
                raise ConfigError("--check needs --by COLUMN, the patient id column to check")
            if self.resplit or self.stratify:
                raise ConfigError("--check only reads the existing split; --resplit and --stratify are for splitting")
        elif not self.out:
            raise ConfigError("give --out FILE.csv for the split manifest (or --check to look for leakage)")

    def check_values(self) -> None:
        super().check_values()
        check_ratios(self.ratios, "--ratios")


@dataclass
class CompareSettings(Settings):
    """A paired comparison of runs on the same images (the runs themselves are the command's arguments)."""

    split: str = setting("test", "Which split's predictions to compare.", flag="--on")
    out: str = setting("comparison", "Folder for comparison.csv/.json and forest.png.", path={})
    metric: str | None = setting(None, "Headline metric (default: the task's, e.g. auroc_macro or r2_macro).")
    bootstrap: int = setting(1000, "Paired bootstrap replicates.", **BOOTSTRAP)
    seed: int = setting(0, "Seed of the bootstrap.", **SEED)
    overwrite: bool = setting(False, "Replace an existing --out.")


@dataclass
class ImportSettings(Settings):
    """Turning a checkpoint fine-tuned elsewhere into a retinafm checkpoint (the file is the argument)."""

    source: ImportSource = setting("retfound", "Which codebase fine-tuned the checkpoint.", flag="--from",
                                   required=True)
    classes: list[str] = setting(help="Class names in the order of the head's outputs (RETFound: sorted folder "
                                      "names), comma-separated.", default_factory=list, required=True)
    out: str = setting("", "retinafm checkpoint to write.", path={"dir_okay": False}, required=True)
    overwrite: bool = setting(False, "Replace an existing --out.")


@dataclass
class ProbeSettings:
    """`retinafm probe` (and the probes of finetune --adaptation lp, refine and label-efficiency). The task
    type itself is checked where the tasks are known (workflows.probe.check_probe)."""

    task: str = setting("multiclass", "A task type: multiclass, multilabel or regression.")
    label_column: str = setting("label", "Multi-class: the class column.")
    columns: str | None = setting(None, "Multi-label: the 0/1 label columns; regression: the value columns "
                                        "(comma-separated).")
    knn_k: int = setting(20, "Neighbours of the kNN classifier / regressor reported beside the probe.",
                         bounds=(1, 100_000))
    folds: int = setting(5, "k-fold on train when there is no val split.", bounds=(2, 100))
    max_iter: int = setting(2000, "Iterations of the probe's solver.", bounds=(1, 1_000_000))
    threshold: float | None = setting(0.5, "Multi-label decision threshold, or 'youden' (chosen per label on "
                                           "validation).")
    bootstrap: int = setting(1000, "Replicates for the test CIs (0: none).", **BOOTSTRAP)
    seed: int = setting(0, "Random seed.", **SEED)

    def check(self) -> None:
        if self.knn_k < 1 or self.folds < 2:
            raise ConfigError("--knn-k must be at least 1 and --folds at least 2")
        if self.bootstrap < 0 or 0 < self.bootstrap < 100:
            raise ConfigError(f"--bootstrap must be 0 or at least 100 replicates, got {self.bootstrap}")
