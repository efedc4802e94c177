"""Load on `retinafm serve`: many predict requests from concurrent clients against the real server.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py [--requests 200] [--clients 16]
        [--runs DIR --checkpoint ID] [--image-size 128] [--append benchmarks/RESULTS.md]

Starts `python -m retinafm serve` in a subprocess on a free loopback port, over `--runs` (default: a
temporary folder holding a vit_micro_patch8 checkpoint made here, random weights, 64 px input), waits
until GET /api/models answers, sends one warm-up request (the model is loaded on first use), then
`--requests` POST /api/predict requests, one small PNG each, every other one with heatmaps, from
`--clients` threads (each its own httpx connection). Reports whether all succeeded, requests/s over
the whole run, p50 / p95 latency (all requests, and with / without heatmaps), and the server's resident
memory (psutil, else /proc/<pid>/status VmRSS) when it was ready, after the warm-up, half-way, at the
end and the highest seen (sampled every 0.1 s): flat from half-way to the end means no request leaks.
`--append FILE` inserts the table, with the machine and the date, as the newest entry of FILE.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or by path: its sibling
from explain_speed import cpu_model  # noqa: E402  (lscpu's model name, as every entry of RESULTS.md states it)


def rss_mib(pid: int) -> float:
    """The resident memory of process `pid` in MiB (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        pass
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_runs(folder: Path) -> tuple[Path, str]:
    """A --runs folder with one vit_micro_patch8 classifier (random weights, 64 px): the server's cost
    per request, not a big model's forward."""
    import torch

    from retinafm.engine.checkpoint import CheckpointMeta, save_checkpoint
    from retinafm.models.registry import create_model, get_spec

    spec = get_spec("vit_micro_patch8")
    torch.manual_seed(0)
    names = ["normal", "glaucoma", "amd"]
    model = create_model(spec, len(names), input_size=64, global_pool="avg")
    meta = CheckpointMeta(model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), task="multiclass",
                          class_names=names, input_size=64, mean=list(spec.mean), std=list(spec.std),
                          global_pool="avg", modality="any", patch_size=spec.patch_size, settings={}, head={})
    save_checkpoint(folder / "micro" / "checkpoint-best.pth", model, meta)
    return folder, "micro/checkpoint-best.pth"


def fundus_png(size: int, seed: int) -> bytes:
    """A synthetic fundus photograph (data.synthetic) as PNG bytes."""
    import numpy as np
    from PIL import Image

    from retinafm.data.synthetic import CLASSES, render_fundus

    image = render_fundus(np.random.default_rng(seed), CLASSES[seed % len(CLASSES)], size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(runs: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "retinafm", "serve", "--runs", str(runs), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(base: str, server: subprocess.Popen, timeout: float = 180.0) -> float:
    import httpx

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}): {server.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/api/models", timeout=5).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def run_load(base: str, checkpoint: str, images: list[bytes], requests: int, clients: int, pid: int) -> dict:
    """Send `requests` predicts from `clients` threads; latencies, failures and memory samples."""
    import httpx

    next_index, lock = [0], threading.Lock()
    latencies: dict[bool, list[float]] = {True: [], False: []}
    failures: list[str] = []
    memory = {"mid": float("nan")}
    done = [0]
    peak = [rss_mib(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], rss_mib(pid))

    def client() -> None:
        with httpx.Client(base_url=base, timeout=300) as http:
            while True:
                with lock:
                    index = next_index[0]
                    next_index[0] += 1
                if index >= requests:
                    return
                heatmaps = index % 2 == 0
                started = time.perf_counter()
                try:
                    answer = http.post("/api/predict", data={"checkpoint": checkpoint,
                                                             "heatmaps": "true" if heatmaps else "false"},
                                       files=[("file", (f"image{index}.png", images[index % len(images)]))])
                    ok = answer.status_code == 200 and len(answer.json()["results"]) == 1
                    if ok and heatmaps:
                        ok = answer.json()["results"][0]["overlay"].startswith("data:image/png;base64,")
                    if not ok:
                        failures.append(f"{answer.status_code}: {answer.text[:200]}")
                except Exception as exc:  # a refused connection, a timeout: counted, not raised
                    failures.append(f"{type(exc).__name__}: {exc}")
                elapsed = time.perf_counter() - started
                with lock:
                    latencies[heatmaps].append(elapsed)
                    done[0] += 1
                    if done[0] == requests // 2:
                        memory["mid"] = rss_mib(pid)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    memory["end"] = rss_mib(pid)
    memory["peak"] = max(peak[0], memory["end"])
    return {"wall": wall, "latencies": latencies, "failures": failures, "memory": memory}


def table(result: dict, requests: int, clients: int, memory: dict) -> str:
    lat = result["latencies"]
    every = lat[True] + lat[False]
    ok = requests - len(result["failures"])

    def row(name: str, values: list[float]) -> str:
        return (f"| {name} | {len(values)} | {percentile(values, 0.5) * 1000:.0f} | "
                f"{percentile(values, 0.95) * 1000:.0f} |")

    lines = [
        f"All {requests} requests from {clients} clients succeeded: **{'yes' if ok == requests else 'NO'}** "
        f"({ok}/{requests}); {requests / result['wall']:.1f} requests/s ({result['wall']:.1f} s in all).",
        "",
        "| requests | n | p50 latency (ms) | p95 latency (ms) |",
        "| --- | --- | --- | --- |",
        row("all", every), row("with heatmaps", lat[True]), row("without heatmaps", lat[False]),
        "",
        "| server RSS (MiB): ready | after warm-up | half-way | end | highest |",
        "| --- | --- | --- | --- | --- |",
        f"| {memory['ready']:.0f} | {memory['warm']:.0f} | {memory['mid']:.0f} | {memory['end']:.0f} | "
        f"{memory['peak']:.0f} |",
    ]
    return "\n".join(lines)


def insert_newest(path: Path, entry: str) -> None:
    """`entry` as the newest entry of RESULTS.md: before its first dated '## 20..' section."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    marker = "\n## 20"
    at = text.find(marker)
    updated = (text[:at + 1] + entry + "\n" + text[at + 1:]) if at >= 0 else f"{text.rstrip()}\n\n{entry}"
    from retinafm.files.outputs import write_text

    write_text(path, updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--runs", type=Path, help="a --runs folder (default: one made with a tiny model)")
    parser.add_argument("--checkpoint", help="the model id to predict with (with --runs)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the uploaded PNGs")
    parser.add_argument("--append", type=Path, help="insert the results as the newest entry of this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))

    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        if args.runs:
            runs, checkpoint = args.runs, args.checkpoint
            if not checkpoint:
                parser.error("--runs needs --checkpoint (a model id from GET /api/models)")
        else:
            runs, checkpoint = tiny_runs(Path(scratch))
        images = [fundus_png(args.image_size, seed) for seed in range(8)]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(runs, port)
        try:
            import httpx

            startup = wait_ready(base, server)
            memory = {"ready": rss_mib(server.pid)}
            warm = httpx.post(f"{base}/api/predict", data={"checkpoint": checkpoint},
                              files=[("file", ("warm.png", images[0]))], timeout=300)
            if warm.status_code != 200:
                raise RuntimeError(f"the warm-up request failed: {warm.status_code} {warm.text[:500]}")
            memory["warm"] = rss_mib(server.pid)
            result = run_load(base, checkpoint, images, args.requests, args.clients, server.pid)
            memory.update(result["memory"])
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    import torch

    text = table(result, args.requests, args.clients, memory)
    load = os.getloadavg()
    machine = (f"{cpu_model()}, {os.cpu_count()} cores (shared with other sessions; load average {load[0]:.1f}); "
               f"torch {torch.__version__}, Python {platform.python_version()}")
    settings = (f"{'vit_micro_patch8, random weights, 64 px input' if not args.runs else checkpoint}; one "
                f"{args.image_size} px PNG per request, heatmaps (grad-rollout) on every other request; "
                f"server ready {startup:.1f} s after start")
    print(f"{machine}\n{settings}\n\n{text}")
    for failure in result["failures"][:5]:
        print("failed:", failure)
    if args.append:
        entry = (f"## {datetime.date.today().isoformat()}: `retinafm serve` under load "
                 f"(`benchmarks/serve_load.py`)\n\n- Machine: {machine}.\n- Settings: {settings}.\n\n{text}\n")
        insert_newest(args.append, entry)
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
