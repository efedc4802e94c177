from __future__ import annotations

import pytest
import torch

from retinafm.engine.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    meta_of,
    save_checkpoint,
    unwrap,
)
from retinafm.engine.inference import model_from_checkpoint
from retinafm.models.registry import create_model, get_spec


def _meta(**kw) -> CheckpointMeta:
    spec = get_spec("vit_micro_patch8")
    base = dict(model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), task="multiclass",
                class_names=["b", "a"], input_size=32, mean=list(spec.mean), std=list(spec.std), global_pool="avg",
                modality="any", patch_size=8, settings={"epochs": 1}, metrics={"auroc_macro": 0.5}, epoch=0)
    base.update(kw)
    return CheckpointMeta(**base)


def test_round_trip_with_weights_only(tmp_path):
    model = create_model(get_spec("vit_micro_patch8"), num_classes=2, input_size=32, global_pool="avg")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c.pth", model, _meta(), optimizer=opt)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # what a user can do with no retinafm
    assert "fc_norm.weight" in raw["model"] and raw["retinafm"]["class_names"] == ["b", "a"]
    assert raw["retinafm"]["versions"]["torch"] == torch.__version__
    assert "optimizer" in raw
    rebuilt, meta = model_from_checkpoint(load_checkpoint(path))
    assert meta.class_names == ["b", "a"] and meta.input_size == 32
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(rebuilt(x), model(x))


def test_unwrap_ddp_like_wrappers():
    inner = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Module()
    wrapper.module = inner
    assert unwrap(wrapper) is inner and unwrap(inner) is inner


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")
    plain = tmp_path / "plain.pth"
    torch.save({"model": {}}, plain)
    with pytest.raises(CheckpointError, match="not a retinafm checkpoint"):
        load_checkpoint(plain)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be opened"):
        load_checkpoint(junk)


def test_weights_that_do_not_fit_the_metadata(tmp_path):
    model = create_model(get_spec("vit_micro_patch8"), num_classes=3, input_size=32, global_pool="avg")
    path = save_checkpoint(tmp_path / "c.pth", model, _meta())  # metadata says 2 classes
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(load_checkpoint(path))
    assert meta_of(load_checkpoint(path)).arch == "vit_tiny_patch16_224"
