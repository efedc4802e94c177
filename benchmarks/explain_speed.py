"""What a heatmap costs: seconds per image of each `retinafm.engine.heatmaps` method against plain inference.

    PYTHONPATH=src .venv/bin/python benchmarks/explain_speed.py [--models vit_tiny_patch16_224,vit_base_patch16_224]
        [--batch-size 4] [--ig-batch-size 1] [--repeats 3] [--warmup 1] [--threads N] [--append FILE]

For each timm model (randomly initialised, no download), one batch of random 224 px images is run through
`explain_batch` with each method in `METHODS` (integrated gradients with its default steps) and through the
forward a prediction makes (`torch.inference_mode()`, `model(images)`), on the CPU at the same batch size
(integrated gradients, which holds batch x steps images' activations at once, may get its own with
`--ig-batch-size`; `predict` is then timed at that batch too). Each is timed after `--warmup` untimed calls,
over `--repeats` calls taken in turn; the median is reported per image and as a ratio to the prediction's,
which says what a heatmap adds to a predict run and is less sensitive to a busy machine than the seconds
(on a shared machine, `--threads 1` also keeps one preempted thread from stalling the other). Prints a
markdown table; `--append FILE` adds it to FILE with the machine, the load average and the date.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_NAMES = {"vit_tiny_patch16_224": "ViT-Ti/16", "vit_base_patch16_224": "ViT-B/16"}


def cpu_model() -> str:
    """lscpu's model name (the CPU's own words), or the platform's guess without lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.machine()


def interleaved_medians(calls: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each call. Every call runs `warmup` times untimed first (filling the allocator's
    caches and letting oneDNN pick its kernels, costs a long run pays once); the timed repeats then take
    the calls in turn, so that other work starting or stopping on a shared machine falls on all of them
    alike and the ratios hold better than the seconds."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(arch: str, methods: list[str], batch_size: int, ig_batch_size: int, image_size: int, warmup: int,
            repeats: int, steps: int) -> list[tuple[str, int, float]]:
    """(method, batch, seconds per image) for `predict` and each method of one model; `predict` at each
    batch size used, so every ratio compares like with like."""
    import timm
    import torch

    from retinafm.engine.heatmaps import explain_batch

    torch.manual_seed(0)
    kwargs = {} if image_size == 224 else {"img_size": image_size}
    model = timm.create_model(arch, pretrained=False, num_classes=2, **kwargs).eval()
    # Integrated gradients runs batch x steps images at once (captum's default), so its memory is steps
    # times a gradient step's: it gets a batch size of its own.
    cases = [("predict", batch_size), *((m, ig_batch_size if m == "integrated-gradients" else batch_size)
                                        for m in methods)]
    if ig_batch_size != batch_size and "integrated-gradients" in methods:
        cases.insert(cases.index(("integrated-gradients", ig_batch_size)), ("predict", ig_batch_size))
    calls: dict[str, Callable[[], object]] = {}
    for method, batch in cases:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        targets = torch.zeros(batch, dtype=torch.long)
        calls[f"{method}@{batch}"] = (
            (lambda x=images: _predict(model, x)) if method == "predict"
            else (lambda m=method, x=images, t=targets: explain_batch(model, x, t, m, steps=steps)))
    medians = interleaved_medians(calls, warmup, repeats)
    rows = [(method, batch, medians[f"{method}@{batch}"] / batch) for method, batch in cases]
    for method, batch, seconds in rows:
        print(f"  {arch} {method} batch {batch}: {seconds:.4f} s/image", file=sys.stderr, flush=True)
    return rows


def _predict(model, images):
    """The forward a prediction makes."""
    import torch

    with torch.inference_mode():
        return model(images)


def table(results: dict[str, list[tuple[str, int, float]]]) -> str:
    lines = ["| model | method | batch | s/image | ratio to predict |", "| --- | --- | ---: | ---: | ---: |"]
    for arch, rows in results.items():
        predict = {batch: seconds for method, batch, seconds in rows if method == "predict"}
        for method, batch, seconds in rows:
            ratio = "1.0×" if method == "predict" else f"{seconds / predict[batch]:.1f}×"
            lines.append(f"| {MODEL_NAMES.get(arch, arch)} | {method} | {batch} | {seconds:.4f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from retinafm.engine.heatmaps import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16_224,vit_base_patch16_224", help="timm architectures")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ig-batch-size", type=int, default=None,
                        help="integrated gradients' batch (default: --batch-size); it holds batch x steps images' "
                             "activations at once")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (explain_batch's default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--append", type=Path, help="append the table, with the machine and date, to this file")
    args = parser.parse_args(argv)

    import timm
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    ig_batch = args.ig_batch_size or args.batch_size
    results = {arch: measure(arch, args.methods.split(","), args.batch_size, ig_batch, args.image_size, args.warmup,
                             args.repeats, args.steps) for arch in args.models.split(",")}
    # The load average says whether other work shared the cores while this ran.
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} torch threads; torch {torch.__version__}, "
               f"timm {timm.__version__}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    settings = (f"batch {args.batch_size} (integrated gradients: batch {ig_batch}, {args.steps} steps), "
                f"{args.image_size} px, random weights, warm-up {args.warmup}, median of {args.repeats}")
    text = table(results)
    print(f"{machine}\n{settings}\n\n{text}")
    if args.append:
        from retinafm.files.outputs import write_text

        old = args.append.read_text() if args.append.exists() else ""
        entry = f"## {datetime.date.today().isoformat()}: heatmap cost (`benchmarks/explain_speed.py`)\n\n" \
                f"- Machine: {machine}.\n- Settings: {settings}.\n\n{text}\n"
        write_text(args.append, f"{old.rstrip()}\n\n{entry}" if old else entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
