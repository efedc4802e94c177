"""ViT-L/16 on one GPU: the plain fp32 way against retinafm's path, model-only and end to end.

    python benchmarks/gpu.py [--model RETFound_mae_natureCFP] [--images 2048] \
        [--sections inference,training,predict,compile]

Sections (each prints images/s and peak GPU memory; a failing section is reported and skipped):
- inference, model only: random 224 px batches already on the GPU. Plain: timm ViT in fp32 eager
  under `no_grad` (PyTorch's defaults, so no TF32). retinafm: `infer`'s step, bf16 autocast (fp16
  where bf16 is absent) under `inference_mode`, timm's SDPA attention; also with channels-last
  input and `torch.compile` (its own section, last). The bf16 embedding's relative error against fp32.
- fine-tuning step: synthetic batches in host memory. Plain: fp32, `torch.optim.AdamW`,
  cross-entropy, pageable host memory (DataLoader's default). retinafm: `train_one_epoch` with bf16
  autocast, fused layer-decay AdamW and warmup + cosine from `build_optimizer` / `build_scheduler`,
  pinned memory and non-blocking copies, with and without `--grad-checkpointing`.
- predict end to end on fundus-sized JPEGs (2000x2000): the plain pipeline (PIL decode, classic
  torchvision transforms, DataLoader defaults, fp32 model on the GPU) against `retinafm.workflows.predict`
  (a checkpoint of the same model, CSV written) with the same workers and batch. Each runs on 64
  images and on --images images; the steady rate is the difference of the two (start-up and
  model loading cancel out).

Timings use CUDA events (median of the timed iterations) after warm-up. Rows are printed as JSON
when measured and as a table at the end; --json FILE keeps them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

RESULTS: list[dict] = []


def record(section: str, pipeline: str, **values) -> None:
    row = {"section": section, "pipeline": pipeline, **values}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of `step(i)`: CUDA events on a GPU, the host clock on a CPU."""
    for i in range(warmup):
        step(i)
    _sync(device)
    times = []
    for i in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _build(spec, num_classes: int, device: torch.device, plain: bool, drop_path: float = 0.0):
    import timm

    from retinafm.models.registry import create_model

    torch.manual_seed(0)
    if plain:  # what a RETFound user writes
        kwargs = dict(spec.arch_kwargs, img_size=spec.input_size)
        model = timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path,
                                  **kwargs)
    else:
        model = create_model(spec, num_classes, input_size=spec.input_size, drop_path=drop_path)
    return model.to(device)


def _ours(model, inputs: list, device: torch.device, dtype):
    """`infer`'s step: autocast (bf16, or fp16 where bf16 is absent) around the forward pass."""
    from retinafm.runtime.device import autocast

    def step(i: int):
        with autocast(device, dtype):
            return model(inputs[i % len(inputs)])
    return step


def _random_batches(count: int, batch: int, size: int, device: torch.device) -> list[torch.Tensor]:
    """Several input buffers used in rotation, so that no timing measures a cached input."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(batch, 3, size, size, device=device, generator=gen) for _ in range(count)]


def _plain_inference(spec, inputs: list, device: torch.device, args) -> float:
    model = _build(spec, 0, device, plain=True).eval()
    with torch.no_grad():
        return _median_seconds(lambda i: model(inputs[i % len(inputs)]), device, args.warmup, args.iters)


def bench_inference(args, spec, device: torch.device) -> None:
    from retinafm.runtime.device import amp_dtype

    size, batch = spec.input_size, args.batch_size
    inputs = _random_batches(4, batch, size, device)
    dtype = amp_dtype(device)

    _free()
    seconds = _plain_inference(spec, inputs, device, args)
    record("inference", "plain fp32 eager", batch=batch, img_per_s=batch / seconds, peak_gib=_peak_gib())
    _free()

    model = _build(spec, 0, device, plain=False).eval()
    with torch.inference_mode():
        reference = model(inputs[0]).float()  # the same model in fp32, for the error of reduced precision
        out = _ours(model, inputs, device, dtype)(0).float()
        rel = float((out - reference).norm() / reference.norm())
        seconds = _median_seconds(_ours(model, inputs, device, dtype), device, args.warmup, args.iters)
        record("inference", f"retinafm {dtype}", batch=batch, img_per_s=batch / seconds, peak_gib=_peak_gib(),
               rel_error_vs_fp32=rel,
               fused_attention=bool(getattr(model.blocks[0].attn, "fused_attn", False)))
        for big in args.large_batches:
            xs = _random_batches(2, big, size, device)
            seconds = _median_seconds(_ours(model, xs, device, dtype), device, args.warmup, args.iters)
            record("inference", f"retinafm {dtype}", batch=big, img_per_s=big / seconds, peak_gib=_peak_gib())
            del xs
        # Channels-last only changes the patch-embedding convolution's layout in a ViT.
        last = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        model = model.to(memory_format=torch.channels_last)
        seconds = _median_seconds(_ours(model, last, device, dtype), device, args.warmup, args.iters)
        record("inference", f"retinafm {dtype} channels-last", batch=batch, img_per_s=batch / seconds,
               peak_gib=_peak_gib())
    del model
    _free()


def bench_compile(args, spec, device: torch.device) -> None:
    from retinafm.runtime.device import amp_dtype

    size, batch, dtype = spec.input_size, args.batch_size, amp_dtype(device)
    inputs = _random_batches(4, batch, size, device)
    compiled = torch.compile(_build(spec, 0, device, plain=False).eval())
    t0 = time.perf_counter()
    with torch.inference_mode():
        _ours(compiled, inputs, device, dtype)(0)
        _sync(device)
        compile_s = time.perf_counter() - t0
        seconds = _median_seconds(_ours(compiled, inputs, device, dtype), device, args.warmup, args.iters)
    record("inference", f"retinafm {dtype} torch.compile", batch=batch, img_per_s=batch / seconds,
           peak_gib=_peak_gib(), compile_seconds=compile_s)
    del compiled
    _free()


class _SyntheticLoader:
    """What a DataLoader hands the training loop: `Batch`es in host memory (pinned or pageable)."""

    def __init__(self, batch: int, size: int, steps: int, pinned: bool) -> None:
        from retinafm.data.loader import Batch

        gen = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(min(steps, 4)):
            images = torch.randn(batch, 3, size, size, generator=gen)
            targets = torch.randint(0, 5, (batch,), generator=gen)
            b = Batch(images, targets, torch.arange(batch))
            self.batches.append(b.pin_memory() if pinned else b)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def _plain_training(spec, batch: int, device: torch.device, args) -> float:
    """Median seconds per step of the loop a RETFound user writes: fp32, torch's AdamW, pageable memory."""
    model = _build(spec, 5, device, plain=True, drop_path=0.2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    data = _SyntheticLoader(batch, spec.input_size, 4, pinned=False)

    def step(i: int) -> None:
        b = data.batches[i % len(data.batches)]
        optimizer.zero_grad()
        loss_fn(model(b.images.to(device)), b.targets.to(device)).backward()
        optimizer.step()

    return _median_seconds(step, device, args.warmup, args.train_iters)


def _ours_training(spec, batch: int, device: torch.device, args, checkpointing: bool) -> tuple[float, bool]:
    """Seconds for an epoch of `train_one_epoch` (after a warm-up epoch), as a finetune run trains."""
    from retinafm.engine.loop import StepSettings, train_one_epoch
    from retinafm.engine.optim import build_optimizer, build_scheduler
    from retinafm.objectives.supervised import Supervised
    from retinafm.runtime.device import amp_dtype

    model = _build(spec, 5, device, plain=False, drop_path=0.2)
    model.set_grad_checkpointing(checkpointing)
    optimizer = build_optimizer(model, 1e-4, 0.05, 0.65)
    scheduler = build_scheduler(optimizer, steps_per_epoch=args.train_iters, epochs=2, warmup_epochs=1, min_lr=1e-6)
    settings = StepSettings(1, None, amp_dtype(device))
    scaler = torch.amp.GradScaler("cuda", enabled=settings.amp_dtype == torch.float16)
    for epoch, steps in enumerate((args.warmup, args.train_iters)):
        loader = _SyntheticLoader(batch, spec.input_size, steps, pinned=device.type == "cuda")
        _sync(device)
        t0 = time.perf_counter()
        train_one_epoch(Supervised(model, torch.nn.CrossEntropyLoss()), loader, optimizer, scheduler, device,
                        epoch=epoch, settings=settings, scaler=scaler, progress=False)
        _sync(device)
        seconds = time.perf_counter() - t0
    return seconds, bool(optimizer.defaults.get("fused"))


def bench_training(args, spec, device: torch.device) -> None:
    from retinafm.runtime.device import amp_dtype

    for batch in args.train_batches:
        _free()
        seconds = _plain_training(spec, batch, device, args)
        record("fine-tuning step", "plain fp32, torch AdamW", batch=batch, img_per_s=batch / seconds,
               peak_gib=_peak_gib())
        for checkpointing in (False, True):
            _free()
            seconds, fused = _ours_training(spec, batch, device, args, checkpointing)
            name = f"retinafm {amp_dtype(device)}, fused AdamW" + (", grad checkpointing" if checkpointing else "")
            record("fine-tuning step", name, batch=batch, img_per_s=batch * args.train_iters / seconds,
                   peak_gib=_peak_gib(), fused=fused)
    _free()


def _make_folder(root: Path, count: int, source: Path) -> Path:
    """`count` files linked from the rendered JPEGs in `source` (decoding cost is per file, not per content)."""
    folder = root / f"images_{count}"
    folder.mkdir()
    files = sorted(source.iterdir())
    for i in range(count):
        os.link(files[i % len(files)], folder / f"{i:05d}.jpg")
    return folder


def _plain_predict(spec, folder: Path, device: torch.device, batch: int, workers: int) -> int:
    from inference import plain_eval_images
    from torch.utils.data import DataLoader

    model = _build(spec, 3, device, plain=True).eval()
    rows = []
    with torch.no_grad():
        for images in DataLoader(plain_eval_images(folder, spec.mean, spec.std), batch_size=batch,
                                 num_workers=workers):
            rows.append(model(images.to(device)).softmax(dim=1).cpu())
    return sum(len(r) for r in rows)


def bench_predict(args, spec, device: torch.device, work: Path) -> None:
    from inference import _checkpoint, make_images

    from retinafm.settings import PredictSettings
    from retinafm.workflows.predict import predict

    t0 = time.perf_counter()
    source = make_images(work / "rendered", "fundus_jpeg_2000", args.unique_images)
    folders = {n: _make_folder(work, n, source) for n in (64, args.images)}
    print(f"rendered {args.unique_images} fundus JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
    checkpoint = work / "model.pth"
    _checkpoint(spec.name, checkpoint)
    seconds = {}
    for pipeline in ("plain fp32", "retinafm"):
        for n, folder in folders.items():
            _free()
            _sync(device)
            t0 = time.perf_counter()
            if pipeline == "plain fp32":
                done = _plain_predict(spec, folder, device, args.batch_size, args.workers)
            else:
                out = work / f"predictions_{n}.csv"
                done = len(predict(PredictSettings(checkpoint=checkpoint, images=folder, out=out,
                                                   batch_size=args.batch_size, device=str(device),
                                                   num_workers=args.workers), progress=False).predictions)
            _sync(device)
            seconds[pipeline, n] = time.perf_counter() - t0
            assert done == n, (pipeline, n, done)
        big = seconds[pipeline, args.images]
        steady = (args.images - 64) / (big - seconds[pipeline, 64])
        record("predict end to end, fundus JPEG 2000x2000", pipeline, batch=args.batch_size, workers=args.workers,
               images=args.images, img_per_s=args.images / big, steady_img_per_s=steady,
               startup_s=seconds[pipeline, 64] - 64 / steady, peak_gib=_peak_gib())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RETFound_mae_natureCFP")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=256, help="inference and predict batch")
    parser.add_argument("--large-batches", default="512", help="extra inference batch sizes for ours")
    parser.add_argument("--train-batches", default="16,64")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--train-iters", type=int, default=10)
    parser.add_argument("--images", type=int, default=2048, help="predict end to end: images in the large run")
    parser.add_argument("--unique-images", type=int, default=16, help="distinct JPEGs rendered (then linked)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--sections", default="inference,training,predict,compile",
                        help="compile: torch.compile inference (a minute or more to compile)")
    parser.add_argument("--json", help="also write the machine and every row to this JSON file")
    args = parser.parse_args(argv)
    args.large_batches = [int(b) for b in args.large_batches.split(",") if b]
    args.train_batches = [int(b) for b in args.train_batches.split(",") if b]

    from retinafm.models.registry import get_spec

    device = torch.device(args.device)
    spec = get_spec(args.model)
    import timm

    machine = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "cpu_cores": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "model": spec.name, "arch": spec.arch,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(machine), flush=True)
    sections = {"inference": lambda: bench_inference(args, spec, device),
                "training": lambda: bench_training(args, spec, device),
                "compile": lambda: bench_compile(args, spec, device)}
    failures = []
    unknown = set(args.sections.split(",")) - {*sections, "predict"}
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; "
                     "choose from inference,training,predict,compile")
    with tempfile.TemporaryDirectory() as work:
        sections["predict"] = lambda: bench_predict(args, spec, device, Path(work))
        for name in args.sections.split(","):
            t0 = time.perf_counter()
            try:
                sections[name]()
            except Exception as exc:  # report and go on: one broken section must not lose the others
                import traceback

                traceback.print_exc()
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"[{name}: {time.perf_counter() - t0:.0f}s]", flush=True)
            _free()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": RESULTS, "failures": failures},
                                              indent=1))
    print(f"\n{machine['gpu']}, torch {machine['torch']}, timm {machine['timm']}, {spec.name} ({spec.arch})")
    print(f"{'section':42} {'pipeline':48} {'batch':>5} {'img/s':>9} {'peak GiB':>9}")
    for row in RESULTS:
        rate = row.get("steady_img_per_s", row["img_per_s"])
        print(f"{row['section']:42} {row['pipeline']:48} {row['batch']:5d} {rate:9.1f} {row['peak_gib']:9.2f}")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
