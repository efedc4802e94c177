"""Do the heatmaps point at the lesions? A tiny ViT fine-tuned on synthetic lesion images, then measured.

    .venv/bin/python benchmarks/explain_localisation.py [--out DIR] [--train 400] [--epochs 30]

The synthetic generator knows where it drew every lesion (data.synthetic.write_lesion_dataset: healthy
against 1-4 haemorrhages or exudates anywhere in the field of view, a mask per image). A vit_micro_patch8
(4 blocks, 64 px input) is fine-tuned from scratch on it, then `retinafm explain --evaluate --masks` runs
every heatmap method on the test split, explaining the `lesions` output, and writes faithfulness.csv
(deletion / insertion AUC against random patch maps) and localisation.csv (pointing game and energy in
the masks against random maps and a centre bias). The tables are printed as markdown for RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(out: Path, n_train: int, epochs: int, n_test: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    from retinafm.data.synthetic import write_lesion_dataset
    from retinafm.files.inputs import read_table
    from retinafm.settings import ExplainSettings, FinetuneSettings
    from retinafm.workflows.explain import explain
    from retinafm.workflows.finetune import finetune

    manifest = out / "data" / "manifest.csv"
    if not manifest.exists():  # a second run in the same --out reuses the data and the fine-tuned model
        manifest = write_lesion_dataset(out / "data", n_train=n_train, n_val=max(n_train // 4, 20), n_test=n_test,
                                        size=128, seed=seed)
    run_dir = out / "run"
    if not (run_dir / "checkpoint-best.pth").exists():
        finetune(FinetuneSettings(
            out=str(run_dir), manifest=str(manifest), model="vit_micro_patch8", weights="none", input_size=64,
            epochs=epochs, warmup_epochs=2, batch_size=32, lr=1e-3, layer_decay=1.0, drop_path=0.0,
            randaug_magnitude=0, reprob=0.0, crop_min_scale=0.8, smoothing=0.0, num_workers=2, device="cpu",
            bootstrap=0, seed=seed))
    metrics = read_table(run_dir / "metrics_test.csv", what="metrics").iloc[0].to_dict()
    frame = read_table(manifest, what="manifest")
    test = frame[frame["split"] == "test"].assign(path=lambda f: [str(manifest.parent / p) for p in f["path"]])
    test_manifest = out / "test.csv"
    test[["path", "label"]].to_csv(test_manifest, index=False)
    explained = out / "explained"
    explain(ExplainSettings(checkpoint=str(run_dir / "checkpoint-best.pth"), images=str(test_manifest),
                            out=str(explained), target="lesions", evaluate=True, masks=str(manifest.parent / "masks"),
                            device="cpu", num_workers=2, batch_size=16, overwrite=True, seed=seed))
    return (read_table(explained / "faithfulness.csv", what="faithfulness"),
            read_table(explained / "localisation.csv", what="localisation"), metrics)


def markdown(frame: pd.DataFrame, columns: dict[str, str]) -> str:
    """Mean [95% CI] per measure, one row per method."""
    lines = ["| method | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    for _, row in frame.iterrows():
        cells = []
        for column in columns:
            if f"{column}_ci_low" in frame.columns and pd.notna(row.get(f"{column}_ci_low")):
                cells.append(f"{row[column]:.3f} [{row[f'{column}_ci_low']:.3f}, {row[f'{column}_ci_high']:.3f}]")
            else:
                cells.append(f"{row[column]:.3f}")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--train", type=int, default=400, help="training images (half with lesions)")
    parser.add_argument("--test", type=int, default=100, help="test images (half with lesions)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        faithfulness, localisation, metrics = run(out, args.train, args.epochs, args.test, args.seed)
    print(f"test AUROC of the fine-tuned model: {metrics.get('auroc_macro', float('nan')):.3f}")
    print(markdown(faithfulness, {"deletion_auc": "deletion AUC (lower: more faithful)",
                                  "insertion_auc": "insertion AUC (higher: more faithful)"}))
    print()
    print(markdown(localisation, {"pointing_hit": "pointing game hit rate", "energy_in_mask": "energy in masks",
                                  "mask_area": "mask area share"}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
