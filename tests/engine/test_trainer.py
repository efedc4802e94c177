"""The one trainer: run directory, hooks, checkpoints in the one layout, steps per epoch."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from retinafm.data.loader import ImageDataset
from retinafm.data.transforms import eval_transform
from retinafm.engine.trainer import Hooks, Trainer, TrainerSettings
from retinafm.files import OutputExistsError


class _Regress(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 1)

    def forward(self, batch):
        return {"loss": ((self.fc(batch.images.flatten(1)).squeeze(1) - batch.targets.float()) ** 2).mean()}


class _EveryOther:
    """A validator that calls even epochs the best so far."""

    def __init__(self):
        self.calls = 0

    def __call__(self, epoch, row):
        self.calls += 1
        return {"val_score": float(epoch)}, epoch % 2 == 0

    def state(self):
        return {"validator_calls": self.calls}

    def load_state(self, state):
        self.calls = state["validator_calls"]


@pytest.fixture
def dataset(tmp_path):
    paths = []
    for i in range(10):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 25 * i, np.uint8)).save(path)
        paths.append(str(path))
    return ImageDataset(paths, [i % 2 for i in range(10)], eval_transform(8, (0.5,) * 3, (0.5,) * 3))


def _settings(out, **kw) -> TrainerSettings:
    return TrainerSettings(**{**dict(out=str(out), kind="pretrain", device="cpu", precision="fp32", epochs=3,
                                     batch_size=4, lr=0.01, warmup_epochs=0), **kw})


def test_fit_writes_log_and_checkpoints_and_calls_the_hooks(dataset, tmp_path):
    trainer = Trainer(_settings(tmp_path / "run"))
    calls = {"before": [], "steps": [], "after": []}
    validator = _EveryOther()
    hooks = Hooks(validate=validator, before_epoch=calls["before"].append, after_step=calls["steps"].append,
                  after_epoch=lambda epoch, row: calls["after"].append((epoch, sorted(row))))
    rows = trainer.fit(_Regress(), dataset, meta=lambda: {"note": "x"}, hooks=hooks)

    assert calls["before"] == [0, 1, 2]
    # 10 images, batches of 4: the ragged last batch is dropped, 2 updates per epoch, numbered globally
    assert trainer.updates_per_epoch(len(dataset)) == 2 and calls["steps"] == [1, 2, 3, 4, 5, 6]
    assert [e for e, _ in calls["after"]] == [0, 1, 2]
    assert calls["after"][0][1] == ["epoch", "lr", "seconds", "train_loss", "val_score"]
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert list(log.columns) == ["epoch", "lr", "train_loss", "val_score", "seconds"] and len(rows) == 3
    last = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    assert last["retinafm"]["kind"] == "pretrain" and last["retinafm"]["format"] == 2
    assert last["retinafm"]["note"] == "x" and last["epoch"] == 2 and last["validator_calls"] == 3
    assert {"optimizer", "rng_cpu", "rng_numpy", "rng_python"} <= set(last) and "fc.weight" in last["model"]
    best = torch.load(tmp_path / "run" / "checkpoint-best.pth", weights_only=True)
    assert best["epoch"] == 2 and "optimizer" not in best  # epochs 0 and 2 were "best"; the last one wins
    assert (tmp_path / "run" / "plots" / "curves.png").is_file()


def test_run_directory_is_never_silently_reused(dataset, tmp_path):
    Trainer(_settings(tmp_path / "run")).fit(_Regress(), dataset, meta=dict)
    with pytest.raises(OutputExistsError):
        Trainer(_settings(tmp_path / "run"))
    from retinafm.settings import ConfigError

    with pytest.raises(ConfigError, match="not a retinafm refinement checkpoint"):
        Trainer(_settings(tmp_path / "run", kind="refine", resume=True))
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(_settings(tmp_path / "new", resume=True))


@pytest.mark.parametrize("size,batch,accum", [(10, 4, 1), (10, 4, 2), (4, 4, 1), (3, 4, 1), (17, 5, 3)])
def test_updates_per_epoch_matches_the_loader(size, batch, accum, dataset, tmp_path):
    from retinafm.data.loader import make_loader

    trainer = Trainer(_settings(tmp_path / "run", batch_size=batch, accum_iter=accum))
    dataset.paths = (dataset.paths * 2)[:size]
    dataset.targets = (dataset.targets * 2)[:size]
    loader = make_loader(dataset, batch, drop_last=trainer._drop_last(size))
    assert trainer.updates_per_epoch(size) == max(1, -(-len(loader) // accum))
