"""`make demo` / `retinafm demo`: the whole path on an embedded data set, on CPU, in minutes.

1. generate a synthetic fundus data set (normal / diabetic retinopathy / glaucoma signs),
2. pretrain a small ViT with MAE on its train and validation images, labels unused (RETFound's
   first stage), 3. fine-tune it, and the same ViT from scratch for comparison,
4. evaluate the best checkpoint on the held-out test split,
5. predict on a folder of new images that includes a real fundus photograph (scikit-image's
   CC0 `retina` image) and a real diabetic-retinopathy crop (`microaneurysms`), with a heatmap of
   each prediction (`predict --heatmaps`).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from retinafm.files import OutputExistsError, write_text
from retinafm.settings import FinetuneSettings, PretrainSettings

MARKER = ".retinafm-demo"
AUROC_TARGET = 0.9


PRETRAIN_EPOCHS = 60


@dataclass
class DemoSummary:
    out: Path
    test_auroc: float
    passed: bool
    seconds: float
    scratch_auroc: float | None = None  # the same fine-tune without MAE pretraining


def demo_config(out: Path, epochs: int | None = None) -> FinetuneSettings:
    """Settings for a from-scratch tiny ViT: no pretrained weights exist offline, so no layer decay,
    a milder crop (lesions must stay in view) and a short warmup."""
    epochs = epochs or 30
    return FinetuneSettings(
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


def demo_pretrain_config(out: Path, epochs: int = PRETRAIN_EPOCHS) -> PretrainSettings:
    """MAE on the demo's train + val images (labels unused): a decoder in proportion to the tiny
    encoder, a learning rate for a short schedule (MAE's blr suits batches of thousands)."""
    return PretrainSettings(
        out=str(out / "pretrain"), images=str(out / "data"), splits="train,val", method="mae",
        model="vit_micro_patch8", input_size=64, epochs=epochs, warmup_epochs=max(1, epochs // 20), batch_size=64,
        lr=1.5e-3, decoder_dim=128, decoder_depth=2, decoder_heads=4, reconstructions=4, num_workers=2,
        device="cpu", seed=0,
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


def _ci_text(ci: tuple[float, float] | None) -> str:
    return f" (95% CI {ci[0]:.4f}–{ci[1]:.4f})" if ci else ""


def run_demo(out: Path, epochs: int | None = None, overwrite: bool = False,
             pretrain_epochs: int = PRETRAIN_EPOCHS) -> DemoSummary:
    """`pretrain_epochs` 0 skips MAE pretraining: the main run is then trained from scratch."""
    from retinafm.data.synthetic import write_demo_dataset
    from retinafm.settings import EvaluateSettings, PredictSettings
    from retinafm.workflows.evaluate import evaluate
    from retinafm.workflows.finetune import finetune
    from retinafm.workflows.predict import predict
    from retinafm.workflows.pretrain import pretrain

    start = time.time()
    out = Path(out)
    _prepare(out, overwrite)
    print(f"[1/5] generating the synthetic fundus data set in {out / 'data'}", flush=True)
    write_demo_dataset(out / "data", seed=0)

    cfg = demo_config(out, epochs)
    scratch = None
    if pretrain_epochs:
        print(f"[2/5] MAE pretraining vit_micro_patch8 on the unlabelled train + val images ({pretrain_epochs} epochs)",
              flush=True)
        pre = pretrain(demo_pretrain_config(out, pretrain_epochs))
        print("[3/5] fine-tuning from scratch (the baseline), then from the MAE-pretrained weights", flush=True)
        baseline = demo_config(out, epochs)
        baseline.out = str(out / "run_from_scratch")
        scratch = finetune(baseline)
        cfg.weights = str(pre.checkpoint)
    else:
        print("[2/5] MAE pretraining skipped (--pretrain-epochs 0)\n[3/5] fine-tuning vit_micro_patch8 on CPU",
              flush=True)
    result = finetune(cfg)
    run_dir = result.run_dir

    print("[4/5] evaluating the best checkpoint on the held-out test split", flush=True)
    ev = evaluate(EvaluateSettings(checkpoint=run_dir / "checkpoint-best.pth", out=out / "evaluation",
                                   data_path=cfg.data_path, split="test", device="cpu", num_workers=cfg.num_workers))

    print("[5/5] predicting on new images (test images + real fundus photographs)", flush=True)
    new_images = out / "new_images"
    real = write_real_images(new_images / "real")
    for src in sorted((out / "data" / "test").rglob("*.png"))[::10]:
        shutil.copy(src, new_images / src.name)
    pred = predict(PredictSettings(checkpoint=run_dir / "checkpoint-best.pth", images=new_images,
                                   out=out / "predictions.csv", heatmaps=out / "heatmaps", device="cpu",
                                   num_workers=cfg.num_workers),
                   progress=False)

    auroc = float(ev.metrics["auroc_macro"])
    passed = auroc >= AUROC_TARGET
    scratch_auroc = float(scratch.test["auroc_macro"]) if scratch is not None and scratch.test else None
    elapsed = time.time() - start
    frame = pred.predictions.set_index("path")
    print("\nReal photographs (the model never saw real images; its answer shows the tool end to end):")
    for p in real:
        row = frame.loc[str(p)]
        probs = ", ".join(f"{c.removeprefix('prob_')} {row[c]:.2f}" for c in frame.columns if c.startswith("prob_"))
        print(f"  {p.name}: {row['prediction']}  ({probs})")
    pretrained_lines = f"""
  MAE pretraining    {out / 'pretrain'}  (checkpoint-last.pth, plots/reconstructions_*.png)
  from scratch       {out / 'run_from_scratch'}  (the same fine-tune without pretraining)""" if scratch else ""
    comparison = f"""
Without MAE pretraining (from scratch): {scratch_auroc:.4f}{_ci_text(_test_ci(out / 'run_from_scratch'))}""" \
        if scratch_auroc is not None else ""
    pretrained_note = " (MAE-pretrained, then fine-tuned)" if scratch else ""
    verdict = "meets" if passed else "BELOW"
    print(f"""
Demo finished in {elapsed / 60:.1f} min.
  data set           {out / 'data'}  (train/val/test/<class>/*.png){pretrained_lines}
  run directory      {run_dir}
                     config.yaml, data_summary.csv, log.csv, checkpoint-best.pth, checkpoint-last.pth,
                     metrics_test.json/.csv (with 95% CIs), predictions_test.csv, plots/*.png
  report             {run_dir / 'report.html'}  (open it in a browser)
  evaluation         {out / 'evaluation'}
  predictions        {out / 'predictions.csv'}  ({len(pred.predictions)} images)
  heatmaps           {out / 'heatmaps'}  (where the model looked: overlays/*.png, heatmaps/*.npy)
Held-out test macro AUROC{pretrained_note}: \
{auroc:.4f}{_ci_text(ev.ci.get("auroc_macro"))}  ({verdict} the {AUROC_TARGET} target){comparison}""",
          flush=True)
    return DemoSummary(out, auroc, passed, elapsed, scratch_auroc)


def _test_ci(run_dir: Path) -> tuple[float, float] | None:
    import json

    metrics = json.loads((run_dir / "metrics_test.json").read_text())
    ci = metrics.get("ci", {}).get("auroc_macro") if isinstance(metrics.get("ci"), dict) else None
    return tuple(ci) if ci else None
