"""The shared loops: a training epoch learns, gradient accumulation steps the right number of
times, inference returns outputs in input order and lists unreadable files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retinafm.data.loader import ImageDataset, make_loader
from retinafm.data.transforms import eval_transform
from retinafm.train.loop import NonFiniteLossError, StepSettings, infer, train_one_epoch
from retinafm.train.optim import build_scheduler


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
    losses = [train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), opt, sched, torch.device("cpu"), epoch=e,
                              settings=StepSettings(accum_iter=accum), progress=False) for e in range(3)]
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
    with pytest.raises(NonFiniteLossError, match="lower --blr"):
        train_one_epoch(model, make_loader(ds, 4), torch.nn.CrossEntropyLoss(), opt, sched, torch.device("cpu"),
                        epoch=0, settings=StepSettings(), progress=False)


def test_no_readable_training_image_is_an_error(tmp_path):
    from retinafm.data.sources import DataSourceError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    ds = ImageDataset([str(bad)] * 4, [0, 1, 0, 1], eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, steps_per_epoch=1, epochs=1, warmup_epochs=0, min_lr=0.0)
    with pytest.raises(DataSourceError, match="none of the training images could be read"):
        train_one_epoch(model, make_loader(ds, 4), torch.nn.CrossEntropyLoss(), opt, sched, torch.device("cpu"),
                        epoch=0, settings=StepSettings(), progress=False)


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
