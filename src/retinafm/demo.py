"""`make demo` / `retinafm demo`: the whole path on an embedded data set, on CPU, in minutes.

1. generate a synthetic fundus data set (normal / diabetic retinopathy / glaucoma signs),
2. fine-tune a small ViT on it, 3. evaluate the best checkpoint on the held-out test split,
4. predict on a folder of new images that includes a real fundus photograph (scikit-image's
   CC0 `retina` image) and a real diabetic-retinopathy crop (`microaneurysms`).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .config import FinetuneConfig
from .files import OutputExistsError, write_text

MARKER = ".retinafm-demo"
AUROC_TARGET = 0.9


@dataclass
class DemoSummary:
    out: Path
    test_auroc: float
    passed: bool
    seconds: float


def demo_config(out: Path, epochs: Optional[int] = None) -> FinetuneConfig:
    """Settings for a from-scratch tiny ViT: no pretrained weights exist offline, so no layer decay,
    a milder crop (lesions must stay in view) and a short warmup."""
    epochs = epochs or 30
    return FinetuneConfig(
        out=str(out / "run"),
        data_path=str(out / "data"),
        model="vit_micro_patch8",
        weights="none",
        input_size=64,
        epochs=epochs,
        warmup_epochs=min(3, epochs - 1),
        batch_size=32,
        lr=1e-3,
        layer_decay=1.0,
        weight_decay=0.05,
        drop_path=0.0,
        smoothing=0.1,
        crop_min_scale=0.6,
        randaug_magnitude=0,
        reprob=0.0,
        num_workers=2,
        device="cpu",
        seed=0,
    )


def write_real_images(folder: Path) -> list[Path]:
    """The real photographs scikit-image ships (no network needed)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "skimage_retina.jpg", folder / "skimage_microaneurysms.png"]
    Image.fromarray(data.retina()).save(paths[0], quality=95)
    micro = data.microaneurysms()
    micro = (micro * 255).astype(np.uint8) if micro.dtype != np.uint8 else micro
    Image.fromarray(micro).save(paths[1])
    return paths


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; pass --overwrite to replace an earlier demo there")
        if not (out / MARKER).exists():
            raise OutputExistsError(f"{out} is not empty and was not written by the demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / MARKER, "written by `retinafm demo`\n")


def _ci_text(ci: Optional[tuple[float, float]]) -> str:
    return f" (95% CI {ci[0]:.4f}–{ci[1]:.4f})" if ci else ""


def run_demo(out: Path, epochs: Optional[int] = None, overwrite: bool = False) -> DemoSummary:
    from .data.synthetic import write_demo_dataset
    from .evaluate.evaluation import evaluate_checkpoint
    from .finetune import finetune
    from .predict import predict

    start = time.time()
    out = Path(out)
    _prepare(out, overwrite)
    print(f"[1/4] generating the synthetic fundus data set in {out / 'data'}", flush=True)
    write_demo_dataset(out / "data", seed=0)

    print("[2/4] fine-tuning vit_micro_patch8 on CPU", flush=True)
    cfg = demo_config(out, epochs)
    result = finetune(cfg)
    run_dir = result.run_dir

    print("[3/4] evaluating the best checkpoint on the held-out test split", flush=True)
    ev = evaluate_checkpoint(run_dir / "checkpoint-best.pth", out / "evaluation", data_path=cfg.data_path,
                             split="test", device="cpu", num_workers=cfg.num_workers)

    print("[4/4] predicting on new images (test images + real fundus photographs)", flush=True)
    new_images = out / "new_images"
    real = write_real_images(new_images / "real")
    for src in sorted((out / "data" / "test").rglob("*.png"))[::10]:
        shutil.copy(src, new_images / src.name)
    pred = predict(run_dir / "checkpoint-best.pth", new_images, out / "predictions.csv", device="cpu",
                   num_workers=cfg.num_workers, progress=False)

    auroc = float(ev.metrics["auroc_macro"])
    passed = auroc >= AUROC_TARGET
    elapsed = time.time() - start
    frame = pred.predictions.set_index("path")
    print("\nReal photographs (the model never saw real images; its answer shows the tool end to end):")
    for p in real:
        row = frame.loc[str(p)]
        probs = ", ".join(f"{c.removeprefix('prob_')} {row[c]:.2f}" for c in frame.columns if c.startswith("prob_"))
        print(f"  {p.name}: {row['prediction']}  ({probs})")
    print(f"""
Demo finished in {elapsed / 60:.1f} min.
  data set           {out / 'data'}  (train/val/test/<class>/*.png)
  run directory      {run_dir}
                     config.yaml, data_summary.csv, log.csv, checkpoint-best.pth, checkpoint-last.pth,
                     metrics_test.json/.csv (with 95% CIs), predictions_test.csv, plots/*.png
  report             {run_dir / 'report.html'}  (open it in a browser)
  evaluation         {out / 'evaluation'}
  predictions        {out / 'predictions.csv'}  ({len(pred.predictions)} images)
Held-out test macro AUROC: {auroc:.4f}{_ci_text(ev.ci.get("auroc_macro"))}  \
({'meets' if passed else 'BELOW'} the {AUROC_TARGET} target)""", flush=True)
    return DemoSummary(out, auroc, passed, elapsed)
