"""Predict, embed and a fine-tuning epoch: the plain pipeline a RETFound user writes today against retinafm's.

    .venv/bin/python benchmarks/inference.py [--models vit_tiny_patch16,vit_base_patch16] [--images 128]

Reference ("the plain way"): a timm ViT in fp32 eager mode under `torch.no_grad()`, PIL decoding
(`Image.open(...).convert("RGB")`), torchvision's classic transforms (Resize(256, bicubic),
CenterCrop(224), ToTensor, Normalize) and a DataLoader with its defaults except the batch size
and worker count, which both pipelines share. retinafm: `retinafm.workflows.predict` (a checkpoint of the
same model and weights, CSV written) and `retinafm.workflows.embed` (parquet written), with its own
decoding (reduced-scale JPEG decode, torchvision decode / v2 transforms on uint8 tensors) and
`torch.inference_mode()`. Same images, model, weights, threads and workers.

Fine-tuning epoch ("train"): the plain loop (PIL, RandomResizedCrop + flip + ToTensor + Normalize,
AdamW, cross-entropy, fp32) against retinafm's (`train_one_epoch` with its uint8 v2 augmentation
including RandAugment, reduced-scale JPEG decode, layer-decay AdamW, warmup + cosine), one pass
over the images, 3 classes.

Cases: fundus-sized JPEGs (2000x2000, with sensor-like grain so they compress like photographs)
and OCT-sized PNGs (512x496 grayscale B-scans). Each measurement runs in a fresh process, so its
peak resident memory (main process) is its own. Prints images/s, the ratio and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = ("fundus_jpeg_2000", "oct_png_512x496")
# Ours running a `retinafm export` file with ONNX Runtime (fp32, or int8 weights with its fusions).
ONNX_TASKS = ("predict_onnx", "embed_onnx", "predict_onnx_int8")


def make_images(folder: Path, case: str, count: int) -> Path:
    import numpy as np
    from PIL import Image

    from retinafm.data.synthetic import render_fundus

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # Rendering a 2000 px fundus takes seconds: render three at 1000 px, upsample, and give every
    # image its own grain (and so its own JPEG data).
    bases = [np.asarray(Image.fromarray(render_fundus(rng, name, size=1000)).resize((2000, 2000), Image.BICUBIC),
                        dtype=np.float32) for name in ("glaucoma", "normal", "diabetic_retinopathy")] \
        if case == "fundus_jpeg_2000" else []
    for i in range(count):
        if case == "fundus_jpeg_2000":
            grain = rng.normal(0, 6, bases[i % 3].shape).astype(np.float32)
            Image.fromarray(np.clip(bases[i % 3] + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg",
                                                                                         quality=90)
        else:
            y = np.arange(496)[:, None]
            band = ((y > 180 + 10 * np.sin(i)) & (y < 300)).astype(float) * 150
            scan = np.clip(band + rng.gamma(2.0, 20.0, size=(496, 512)), 0, 255).astype(np.uint8)
            Image.fromarray(scan).save(folder / f"{i:03d}.png")
    return folder


def _reference_epoch(model_name: str, folder: Path, batch_size: int, workers: int) -> int:
    import timm
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from retinafm.models.registry import get_spec

    spec = get_spec(model_name)
    torch.manual_seed(0)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=3, **spec.arch_kwargs).train()
    transform = T.Compose([T.RandomResizedCrop(224, interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))

    class Images(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return transform(Image.open(paths[i]).convert("RGB")), i % 3

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = 0
    for images, labels in DataLoader(Images(), batch_size=batch_size, num_workers=workers, shuffle=True):
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()
        n += len(images)
    return n


def _retinafm_epoch(model_name: str, folder: Path, batch_size: int, workers: int) -> int:
    import torch

    from retinafm.data.loader import ImageDataset, make_loader
    from retinafm.data.transforms import AugmentSettings, train_transform
    from retinafm.engine.loop import StepSettings, train_one_epoch
    from retinafm.engine.optim import build_optimizer, build_scheduler
    from retinafm.models.registry import create_model, get_spec
    from retinafm.objectives.supervised import Supervised

    spec = get_spec(model_name)
    torch.manual_seed(0)
    model = create_model(spec, 3, input_size=224)
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    dataset = ImageDataset(paths, [i % 3 for i in range(len(paths))],
                           train_transform(224, spec.mean, spec.std, AugmentSettings()))
    loader = make_loader(dataset, batch_size, num_workers=workers, shuffle=True)
    optimizer = build_optimizer(model, 1e-4, 0.05, 0.65)
    scheduler = build_scheduler(optimizer, steps_per_epoch=len(loader), epochs=1, warmup_epochs=0, min_lr=1e-6)
    train_one_epoch(Supervised(model, torch.nn.CrossEntropyLoss()), loader, optimizer, scheduler, torch.device("cpu"),
                    epoch=0, settings=StepSettings(1, None, None), progress=False)
    return len(paths)


def plain_eval_images(folder: Path, mean, std):
    """The evaluation dataset a RETFound user writes: PIL decode and classic torchvision transforms."""
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import Dataset

    transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(mean, std)])
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))

    class Images(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return transform(Image.open(paths[i]).convert("RGB"))

    return Images()


def _reference(model_name: str, folder: Path, batch_size: int, workers: int, embed: bool) -> int:
    import timm
    import torch
    from torch.utils.data import DataLoader

    from retinafm.models.registry import get_spec

    spec = get_spec(model_name)
    torch.manual_seed(0)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=0 if embed else 3, **spec.arch_kwargs).eval()
    rows = []
    with torch.no_grad():
        for batch in DataLoader(plain_eval_images(folder, spec.mean, spec.std), batch_size=batch_size,
                                num_workers=workers):
            out = model(batch)
            rows.append(out if embed else out.softmax(dim=1))
    return sum(len(r) for r in rows)


def _retinafm(model_name: str, folder: Path, batch_size: int, workers: int, embed: bool, out: Path,
              cpu_int8: bool = False, model_file: str = "model.pth") -> int:
    if embed and model_file.endswith(".onnx"):
        from retinafm.settings import EmbedSettings
        from retinafm.workflows.embed import embed as run_embed

        return run_embed(folder, out / "emb.parquet", EmbedSettings(checkpoint=str(out / model_file),
                                                                    batch_size=batch_size, num_workers=workers,
                                                                    device="cpu"), progress=False).count
    if embed:
        from retinafm.settings import EmbedSettings
        from retinafm.workflows.embed import embed as run_embed

        result = run_embed(folder, out / "emb.parquet", EmbedSettings(model=model_name, weights="none",
                                                                     batch_size=batch_size, num_workers=workers,
                                                                     device="cpu"), progress=False)
        return result.count
    from retinafm.settings import PredictSettings
    from retinafm.workflows.predict import predict

    return len(predict(PredictSettings(checkpoint=out / model_file, images=folder, out=out / "p.csv",
                                       batch_size=batch_size, num_workers=workers, device="cpu", cpu_int8=cpu_int8),
                       progress=False).predictions)


def _checkpoint(model_name: str, path: Path) -> None:
    """A 3-class checkpoint of the model with the weights the reference builds (seed 0)."""
    import torch

    from retinafm.engine.checkpoint import CheckpointMeta, save_checkpoint
    from retinafm.models.registry import create_model, get_spec

    spec = get_spec(model_name)
    torch.manual_seed(0)
    model = create_model(spec, 3, input_size=224)
    meta = CheckpointMeta(model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), task="multiclass",
                          class_names=["a", "b", "c"], input_size=224, mean=list(spec.mean), std=list(spec.std),
                          global_pool=str(model.global_pool), modality="any", patch_size=spec.patch_size)
    save_checkpoint(path, model, meta)


def one(args: argparse.Namespace) -> None:
    """A single measurement (run in its own process): prints JSON."""
    import timm  # noqa: F401  (imports are not what is measured: both pipelines start warm)
    import torch
    import torchvision.transforms  # noqa: F401

    import retinafm.workflows.embed  # noqa: F401
    import retinafm.workflows.predict  # noqa: F401

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    folder = work / args.case
    embed = args.task in ("embed", "embed_onnx")
    out = Path(tempfile.mkdtemp(dir=work))
    model_file = "model.pth"
    if args.pipeline == "retinafm" and args.task in ("predict", "predict_int8", *ONNX_TASKS):
        _checkpoint(args.model, out / "model.pth")
    if args.pipeline == "retinafm" and args.task in ONNX_TASKS:
        # `retinafm export` is a one-off step before deployment, so it is not timed (it prints its seconds).
        from retinafm.settings import ExportSettings
        from retinafm.workflows.export import export

        model_file = "model.onnx"
        result = export(ExportSettings(checkpoint=out / "model.pth", out=out / model_file,
                                       int8=args.task.endswith("int8")))
        print(f"export: {result.seconds:.1f}s", file=sys.stderr)
    baseline_mb = _rss_mb()
    sampler = _PeakRSS()
    start = time.perf_counter()
    if args.task == "train":
        run = _reference_epoch if args.pipeline == "reference" else _retinafm_epoch
        n = run(args.model, folder, args.batch_size, args.workers)
    elif args.pipeline == "reference":
        n = _reference(args.model, folder, args.batch_size, args.workers, embed)
    else:
        n = _retinafm(args.model, folder, args.batch_size, args.workers, embed, out, args.task == "predict_int8",
                      model_file)
    seconds = time.perf_counter() - start
    # Memory the work added to the main process at its peak (libraries and imports excluded).
    peak_mb = sampler.stop() - baseline_mb
    print(json.dumps({"images": n, "seconds": seconds, "peak_mb": peak_mb}))


class _PeakRSS:
    """The main process's largest resident size while the work runs, sampled every 5 ms."""

    def __init__(self) -> None:
        import threading

        self.peak, self._done = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(args: argparse.Namespace, case: str, model: str, task: str, pipeline: str) -> dict:
    cmd = [sys.executable, __file__, "--one", "--case", case, "--model", model, "--task", task, "--pipeline", pipeline,
           "--work", args.work, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16,vit_base_patch16")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--tasks", default="predict,embed,predict_onnx,embed_onnx,train,predict_int8,predict_onnx_int8",
                        help="predict_int8: ours with --cpu-int8, *_onnx: ours from a `retinafm export` file, "
                             "all against the fp32 reference")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both pipelines")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both pipelines")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(args)
        return 0
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        cases = args.cases.split(",")
        for case in cases:
            make_images(Path(work) / case, case, args.images)
        import torch

        print(f"{args.images} images per case; {os.cpu_count()} CPU cores, {args.threads} torch threads, "
              f"{args.workers} loader workers, batch {args.batch_size}; torch {torch.__version__}")
        header = f"{'case':18} {'model':18} {'task':17} {'reference img/s':>16} {'retinafm img/s':>15} {'ratio':>6} " \
                 f"{'ref +MB':>8} {'ours +MB':>9}"
        print(header)
        print("-" * len(header))
        for case in cases:
            for model in args.models.split(","):
                for task in args.tasks.split(","):
                    if task in ("train", "predict_int8", "predict_onnx_int8", "embed_onnx") and case != CASES[0]:
                        continue  # one case is enough for these: the model's work is the same
                    ref = measure(args, case, model, task, "reference")
                    ours = measure(args, case, model, task, "retinafm")
                    assert ref["images"] == ours["images"] == args.images, (ref, ours)  # nothing skipped
                    r, o = ref["images"] / ref["seconds"], ours["images"] / ours["seconds"]
                    print(f"{case:18} {model:18} {task:17} {r:16.1f} {o:15.1f} {o / r:5.2f}x "
                          f"{ref['peak_mb']:8.0f} {ours['peak_mb']:9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
