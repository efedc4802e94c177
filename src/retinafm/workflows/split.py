"""`retinafm split`: a patient-grouped, stratified, seeded train/val/test split of a manifest (paths
unchanged), or a patient-leakage check of the split column it already has."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from retinafm.data import splits as sp
from retinafm.files import claim_file, write_csv
from retinafm.settings import ConfigError, SplitSettings


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
    out: Path | None  # where the report was written, if asked


def split(settings: SplitSettings) -> SplitResult:
    """Write the manifest with a new split column to `settings.out`; a manifest that already has one
    is refused unless `settings.resplit`."""
    settings.validate()
    if settings.check:
        raise ConfigError("--check looks for leakage (check_leakage); it does not split")
    with claim_file(settings.out, overwrite=settings.overwrite, inputs=[("--manifest", settings.manifest)]):
        return _split(settings)


def _split(settings: SplitSettings) -> SplitResult:
    manifest, out, by = settings.manifest, str(settings.out), settings.group_by
    frame = sp.read_manifest_table(manifest)
    if sp.has_split(frame) and not settings.resplit:
        counts = sp.split_summary(frame, by=None, stratify="none")["images"].drop("total")
        raise sp.SplitError(f"--manifest {manifest} already has a split column "
                            f"({', '.join(f'{k} {v}' for k, v in counts.items())}); pass --resplit to replace "
                            "it, or check it for patient leakage with --check")
    result = sp.split_manifest(frame, by=by, ratios=settings.ratios, seed=settings.seed, stratify=settings.stratify)
    summary = sp.split_summary(result, by=by, stratify=settings.stratify)
    write_csv(out, result)
    return SplitResult(Path(out), result, summary, result.attrs["split_info"])


def check_leakage(settings: SplitSettings) -> LeakageResult:
    """The ids of `settings.by` whose images lie in more than one split of the manifest's split column
    (written to `settings.out` when given)."""
    settings = dataclasses.replace(settings, check=True)
    settings.validate()
    out, by = settings.out, str(settings.group_by)
    frame = sp.read_manifest_table(settings.manifest)
    report = sp.leakage_report(frame, by=by)
    summary = sp.split_summary(frame, by=by)
    if out:
        with claim_file(out, overwrite=settings.overwrite, inputs=[("--manifest", settings.manifest)]):
            write_csv(out, report)
    return LeakageResult(report, summary, Path(out) if out else None)
