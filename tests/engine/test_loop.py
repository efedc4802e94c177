"""The shared loops: a training epoch learns, gradient accumulation steps the right number of
times, inference returns outputs in input order and lists unreadable files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retinafm.data.loader import ImageDataset, make_loader
from retinafm.data.transforms import eval_transform
from retinafm.engine.infer import infer
from retinafm.engine.loop import NonFiniteLossError, StepSettings, train_one_epoch
from retinafm.engine.optim import build_scheduler
from retinafm.objectives.supervised import Supervised


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture
def images(tmp_path):
    paths, labels = [], []
    for i in range(16):
        label = i % 2
        arr = np.full((8, 8, 3), 220 if label else 30, np.uint8)
        p = tmp_path / f"{i:02d}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
        labels.append(label)
    return paths, labels


def _counting_optimizer(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.steps = 0
    original = opt.step

    def step(*a, **k):
        opt.steps += 1
        return original(*a, **k)

    opt.step = step
    return opt


@pytest.mark.parametrize("accum,expected_steps", [(1, 4), (2, 2), (3, 2)])
def test_epoch_learns_and_accumulates(images, accum, expected_steps):
    torch.manual_seed(0)
    paths, labels = images
    ds = ImageDataset(paths, labels, eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    loader = make_loader(ds, batch_size=4, shuffle=True)
    model = _Tiny()
    opt = _counting_optimizer(model)
    sched = build_scheduler(opt, steps_per_epoch=expected_steps, epochs=3, warmup_epochs=0, min_lr=0.0)
    objective = Supervised(model, torch.nn.CrossEntropyLoss())
    losses = [train_one_epoch(objective, loader, opt, sched, torch.device("cpu"), epoch=e,
                              settings=StepSettings(accum_iter=accum), progress=False)["loss"] for e in range(3)]
    assert opt.steps == 3 * expected_steps
    assert losses[-1] < losses[0]


def test_non_finite_loss_stops_with_advice(images):
    paths, labels = images
    ds = ImageDataset(paths, labels, eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    model = _Tiny()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, steps_per_epoch=4, epochs=1, warmup_epochs=0, min_lr=0.0)
    with pytest.raises(NonFiniteLossError, match="diverged.*Lower the learning rate"):
        train_one_epoch(Supervised(model, torch.nn.CrossEntropyLoss()), make_loader(ds, 4), opt, sched,
                        torch.device("cpu"), epoch=0, settings=StepSettings(), progress=False)


def test_no_readable_training_image_is_an_error(tmp_path):
    from retinafm.data.sources import DataSourceError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    ds = ImageDataset([str(bad)] * 4, [0, 1, 0, 1], eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, steps_per_epoch=1, epochs=1, warmup_epochs=0, min_lr=0.0)
    with pytest.raises(DataSourceError, match="none of the training images could be read"):
        train_one_epoch(Supervised(model, torch.nn.CrossEntropyLoss()), make_loader(ds, 4), opt, sched,
                        torch.device("cpu"), epoch=0, settings=StepSettings(), progress=False)


def test_infer_keeps_input_order_and_reports_skips(images, tmp_path):
    paths, labels = images
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    paths = paths[:5] + [str(bad)] + paths[5:]
    ds = ImageDataset(paths, [None] * len(paths), eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    model = _Tiny().eval()
    res = infer(model, ds, torch.device("cpu"), batch_size=3, num_workers=2, progress=False)
    assert res.indices.tolist() == [i for i in range(len(paths)) if i != 5]
    assert res.skipped == [(str(bad), "not a recognised image format")]
    with torch.no_grad():
        direct = model(torch.stack([ds[i][0] for i in res.indices])).numpy()
    np.testing.assert_allclose(res.logits, direct, rtol=1e-5, atol=1e-6)


class _ThreadSpy(_Tiny):
    """Records the thread and torch's thread count each forward runs with."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def forward(self, x):
        import threading

        self.calls.append((threading.get_ident(), torch.get_num_threads()))
        if self.fail:
            raise RuntimeError("boom")
        return super().forward(x)


@pytest.mark.parametrize("switch_off", ["argument", "environment"])
def test_cpu_infer_runs_batches_side_by_side_with_the_same_outputs(images, monkeypatch, switch_off):
    import threading

    paths, _ = images
    ds = ImageDataset(paths, [None] * len(paths), eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    torch.manual_seed(0)
    model = _ThreadSpy().eval()
    torch.set_num_threads(2)
    try:
        both = infer(model, ds, torch.device("cpu"), batch_size=3, num_workers=2, progress=False)
        assert torch.get_num_threads() == 2  # the streams' one thread each is not left behind
        streamed = list(model.calls)
        model.calls.clear()  # CPU tuning off: one batch at a time, all threads
        if switch_off == "environment":
            monkeypatch.setenv("RETINAFM_CPU_TUNING", "0")
            one = infer(model, ds, torch.device("cpu"), batch_size=3, num_workers=2, progress=False)
        else:
            one = infer(model, ds, torch.device("cpu"), batch_size=3, num_workers=2, progress=False, cpu_tuning=False)
    finally:
        torch.set_num_threads(1)
    assert {threads for _, threads in streamed} == {1}
    assert threading.get_ident() not in {ident for ident, _ in streamed}
    assert {threads for _, threads in model.calls} == {2}
    assert both.indices.tolist() == one.indices.tolist() == list(range(len(paths)))
    np.testing.assert_array_equal(both.logits, one.logits)


def test_cpu_infer_stream_errors_reach_the_caller(images):
    paths, _ = images
    ds = ImageDataset(paths, [None] * len(paths), eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            infer(_ThreadSpy(fail=True).eval(), ds, torch.device("cpu"), batch_size=3, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_cpu_streams_split_the_threads():

    from retinafm.models.onnx import OnnxModel
    from retinafm.runtime.cpu import stream_threads as _cpu_streams

    cpu = torch.device("cpu")
    onnx = OnnxModel(session=None, path=None, global_pool="avg", tta_flip=False)
    try:
        torch.set_num_threads(3)
        assert _cpu_streams(_Tiny(), cpu) == [2, 1]
        assert _cpu_streams(_Tiny(), torch.device("cuda")) == []  # a GPU: one batch at a time
        assert _cpu_streams(onnx, cpu) == []  # ONNX Runtime has its own thread pool
        torch.set_num_threads(1)
        assert _cpu_streams(_Tiny(), cpu) == []
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("loop", ["infer", "train"])
def test_one_loader_iterator_per_pass(images, monkeypatch, progress, loop):
    """tqdm.auto's bar calls iter() on an iterable at construction: handed the DataLoader, it
    started a second set of workers (reset persistent ones) that decoded batches nobody read."""
    from torch.utils.data import DataLoader

    calls = []
    real_iter = DataLoader.__iter__

    def counted(self):
        calls.append(self)
        return real_iter(self)

    monkeypatch.setattr(DataLoader, "__iter__", counted)
    paths, labels = images
    ds = ImageDataset(paths, labels, eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    if loop == "infer":
        res = infer(_Tiny().eval(), ds, torch.device("cpu"), batch_size=4, num_workers=2, progress=progress)
        assert len(res.indices) == len(paths)
    else:  # as finetune trains: persistent workers
        model = _Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = build_scheduler(opt, steps_per_epoch=4, epochs=1, warmup_epochs=0, min_lr=0.0)
        train_one_epoch(Supervised(model, torch.nn.CrossEntropyLoss()),
                        make_loader(ds, 4, num_workers=2, persistent=True), opt, sched, torch.device("cpu"),
                        epoch=0, settings=StepSettings(), progress=progress)
    assert len(calls) == 1


class _TwoViews(torch.nn.Module):
    """An objective over multi-crop batches (a list of views) that also logs a per-step value."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 1)
        self.logged = []

    def forward(self, batch):
        assert isinstance(batch.images, list) and len(batch.images) == 2
        a, b = (self.fc(v.flatten(1)) for v in batch.images)
        value = torch.tensor(float(len(self.logged)))
        self.logged.append(value)
        return {"loss": ((a - b) ** 2).mean() + (a ** 2).mean(), "step_index": value}


def test_objectives_get_the_batch_and_what_they_log_is_averaged_per_step(images):
    paths, _ = images
    tf = eval_transform(8, (0.5,) * 3, (0.5,) * 3)
    ds = ImageDataset(paths, [None] * len(paths), lambda image: [tf(image), tf(image).flip(-1)])
    objective = _TwoViews()
    opt = _counting_optimizer(objective)
    sched = build_scheduler(opt, steps_per_epoch=4, epochs=1, warmup_epochs=0, min_lr=0.0)
    out = train_one_epoch(objective, make_loader(ds, 4), opt, sched, torch.device("cpu"), epoch=0,
                          settings=StepSettings(), progress=False)
    assert opt.steps == 4 and set(out) == {"loss", "step_index"}
    assert out["step_index"] == pytest.approx((0 + 1 + 2 + 3) / 4)
