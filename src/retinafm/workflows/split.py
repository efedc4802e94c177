"""`retinafm split`: a patient-grouped, stratified, seeded train/val/test split of a manifest (paths
unchanged), or a patient-leakage check of the split column it already has."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from retinafm.data import splits as sp
from retinafm.files import refuse_existing_file, write_csv


@dataclass
class SplitResult:
    out: Path
    manifest: pd.DataFrame  # the input rows with their split column
    summary: pd.DataFrame  # images (and groups) per split and stratum
    info: dict[str, Any]  # groups, stratified_by


@dataclass
class LeakageResult:
    report: pd.DataFrame  # one row per group id found in more than one split; empty when clean
    summary: pd.DataFrame
    out: Optional[Path]  # where the report was written, if asked


def group_column(by: str) -> Optional[str]:
    """--by COLUMN, or None for 'none' (image by image)."""
    return None if by.strip().lower() == "none" else by.strip()


def split(manifest: str | Path, out: str | Path, *, by: Optional[str] = "patient_id",
          ratios: str = "0.7,0.15,0.15", seed: int = 0, stratify: Optional[str] = None, resplit: bool = False,
          overwrite: bool = False) -> SplitResult:
    """Write `manifest` with a new split column to `out`; a manifest that already has one is refused
    unless `resplit`."""
    refuse_existing_file(out, overwrite=overwrite)
    frame = sp.read_manifest_table(manifest)
    if sp.has_split(frame) and not resplit:
        counts = sp.split_summary(frame, by=None, stratify="none")["images"].drop("total")
        raise sp.SplitError(f"--manifest {manifest} already has a split column "
                            f"({', '.join(f'{k} {v}' for k, v in counts.items())}); pass --resplit to replace "
                            "it, or check it for patient leakage with --check")
    result = sp.split_manifest(frame, by=by, ratios=ratios, seed=seed, stratify=stratify)
    summary = sp.split_summary(result, by=by, stratify=stratify)
    write_csv(out, result)
    return SplitResult(Path(out), result, summary, result.attrs["split_info"])


def check_leakage(manifest: str | Path, *, by: str = "patient_id", out: str | Path | None = None,
                  overwrite: bool = False) -> LeakageResult:
    """The ids of `by` whose images lie in more than one split of the manifest's split column."""
    if out:
        refuse_existing_file(out, overwrite=overwrite)
    frame = sp.read_manifest_table(manifest)
    report = sp.leakage_report(frame, by=by)
    summary = sp.split_summary(frame, by=by)
    if out:
        write_csv(out, report)
    return LeakageResult(report, summary, Path(out) if out else None)
