"""Start-up: whole-process `retinafm predict` on a small folder against the plain script a user writes.

    PYTHONPATH=src .venv/bin/python benchmarks/startup.py [--images 4] [--repeats 5] [--model vit_small_patch16]

Both run as fresh subprocesses on the same few fundus-sized JPEGs with the same checkpoint
weights, threads and DataLoader workers (2, the CLI's default), so the difference is the fixed
cost: imports, checkpoint loading and set-up. The plain script imports torch, torchvision and
timm, builds the timm model, loads the checkpoint's weights, decodes with PIL, applies the
classic torchvision eval transforms and writes a CSV. Also timed: importing the predict
workflow, and importing torch + torchvision + timm. Medians over the repeats, runs interleaved.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

PLAIN = r'''
import csv, sys
from pathlib import Path

import timm
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

checkpoint, folder, out, arch = sys.argv[1:5]
state = torch.load(checkpoint, map_location="cpu", weights_only=True)
model = timm.create_model(arch, pretrained=False, num_classes=3, global_pool="avg")
model.load_state_dict(state["model"])
model.eval()
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                       T.Normalize(mean, std)])
paths = sorted(p for p in Path(folder).iterdir() if p.suffix == ".jpg")


class Images(Dataset):
    def __len__(self):
        return len(paths)

    def __getitem__(self, i):
        return transform(Image.open(paths[i]).convert("RGB"))


rows = []
with torch.no_grad():
    for batch in DataLoader(Images(), batch_size=32, num_workers=2):
        rows += model(batch).softmax(dim=1).tolist()
with open(out, "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(["path", "prob_a", "prob_b", "prob_c"])
    writer.writerows([str(p), *r] for p, r in zip(paths, rows))
'''


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="vit_small_patch16")
    args = parser.parse_args(argv)

    from inference import _checkpoint, make_images

    from retinafm.models.registry import get_spec

    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = make_images(root / "images", "fundus_jpeg_2000", args.images)
        _checkpoint(args.model, root / "model.pth")
        (root / "plain.py").write_text(PLAIN)
        arch = get_spec(args.model).arch
        commands = {
            "import torch, torchvision, timm": [python, "-c", "import torch, torchvision, timm"],
            "import retinafm.workflows.predict": [python, "-c", "import retinafm.workflows.predict"],
            "plain script (whole process)": [python, str(root / "plain.py"), str(root / "model.pth"), str(folder),
                                             str(root / "plain.csv"), arch],
            "retinafm predict (whole process)": [python, "-m", "retinafm", "predict", "--checkpoint",
                                                 str(root / "model.pth"), "--images", str(folder), "--out",
                                                 str(root / "ours.csv"), "--overwrite", "--device", "cpu"],
        }
        for command in commands.values():  # warm the file cache once
            _seconds(command)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(_seconds(command))
    print(f"{args.images} JPEGs 2000x2000, {args.model}, median of {args.repeats} (min-max):")
    for name, values in times.items():
        print(f"  {name:34s} {statistics.median(values):6.2f} s  ({min(values):.2f}-{max(values):.2f})")
    gap = statistics.median(times["retinafm predict (whole process)"]) - statistics.median(
        times["plain script (whole process)"])
    print(f"  retinafm predict - plain script: {gap:+.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
