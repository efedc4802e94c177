"""Checkpoints written before the one layout (format 1 under "retinafm" without a kind, and the
"retinafm_pretrain" / "retinafm_refine" files) keep loading everywhere they loaded: predict,
evaluate, export, --weights, --init and --resume, with the same predictions and the same resumed run.

Each old file is written here exactly as the code before format 2 wrote it (commit 6f47234:
engine/checkpoint.py save_checkpoint, workflows/pretrain.py and workflows/refine.py), from the
tensors of a file the current code wrote.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from retinafm.data.synthetic import write_report_pairs
from retinafm.engine import trainer as trainer_module
from retinafm.engine.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    meta_of,
    open_checkpoint,
    save_checkpoint,
)
from retinafm.engine.inference import model_from_checkpoint
from retinafm.models.registry import create_model, get_spec
from retinafm.models.weights import detect_family, load_backbone_weights, read_checkpoint
from retinafm.settings import FinetuneSettings, PretrainSettings, RefineSettings

pytestmark = pytest.mark.slow  # each case trains and resumes a tiny run (about 35 s for the file)


def legacy(state: dict[str, Any]) -> dict[str, Any]:
    """A current checkpoint rewritten in the layout its kind had before format 2."""
    info = {k: v for k, v in state["retinafm"].items() if k not in ("format", "kind")}
    kind = state["retinafm"]["kind"]
    training = {k: v for k, v in state.items() if k not in ("model", "retinafm")}
    if kind in ("classifier", "probe"):
        # {"model": ..., "retinafm": {"format": 1, **meta.__dict__, "versions": versions()}} + optimizer, scaler
        # and extra (best_metrics, best_loss, best_epoch, rng) in checkpoint-last; the epoch only in the metadata.
        versions = info.pop("versions")
        training.pop("epoch", None)
        return {"model": state["model"], "retinafm": {"format": 1, **info, "versions": versions}, **training}
    if kind == "pretrain":
        model = state["model"]
        if info["method"] == "mae":
            weights = {"model": model}
        else:  # Dino.checkpoint_state(): DINO's student / teacher and the loss's centre
            parts = (("student", "student."), ("teacher", "teacher."), ("dino_loss", "loss_fn."))
            weights = {part: {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
                       for part, prefix in parts}
        return {**weights, **training, "retinafm_pretrain": info}
    assert kind == "refine"
    return {"model": state["model"], **training, "retinafm_refine": info}


def rewrite_legacy(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save(legacy(state), path)


def _interrupt_after_first_epoch(run, cfg, monkeypatch) -> None:
    said = trainer_module._say

    def stop(msg: str) -> None:
        said(msg)
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "_say", stop)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(trainer_module, "_say", said)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _assert_same_log(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_csv(a / "log.csv").drop(columns="seconds"),
                                  pd.read_csv(b / "log.csv").drop(columns="seconds"), check_exact=True)


# --------------------------------------------------------------------------- classifier (format 1)
def _finetune_settings(data: Path, out: Path, **overrides) -> FinetuneSettings:
    settings = dict(out=str(out), data_path=str(data), model="vit_micro_patch8", weights="none", input_size=32,
                    epochs=2, warmup_epochs=1, batch_size=16, lr=1e-3, layer_decay=1.0, drop_path=0.0,
                    randaug_magnitude=0, reprob=0.0, crop_min_scale=0.5, num_workers=0, device="cpu", bootstrap=0)
    settings.update(overrides)
    return FinetuneSettings(**settings)


def _classifier_meta() -> CheckpointMeta:
    spec = get_spec("vit_micro_patch8")
    return CheckpointMeta(model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), task="multiclass",
                          class_names=["diabetic_retinopathy", "glaucoma", "normal"], input_size=32,
                          mean=list(spec.mean), std=list(spec.std), global_pool="avg", modality="any",
                          patch_size=8, settings={"epochs": 1}, metrics={"auroc_macro": 0.5}, epoch=0)


def test_format_1_classifier_predicts_evaluates_exports_and_loads_as_weights(demo_data, tmp_path):
    from retinafm.settings import EvaluateSettings, PredictSettings
    from retinafm.workflows.evaluate import evaluate
    from retinafm.workflows.predict import predict

    torch.manual_seed(0)
    model = create_model(get_spec("vit_micro_patch8"), 3, input_size=32, global_pool="avg")
    new = save_checkpoint(tmp_path / "new.pth", model, _classifier_meta())
    old = tmp_path / "old.pth"
    torch.save(legacy(torch.load(new, weights_only=True)), old)
    raw = torch.load(old, weights_only=True)
    assert raw["retinafm"]["format"] == 1 and "kind" not in raw["retinafm"]

    state = load_checkpoint(old)
    assert meta_of(state) == meta_of(load_checkpoint(new))
    rebuilt, _ = model_from_checkpoint(state)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)

    kwargs = dict(device="cpu", num_workers=0, precision="fp32")
    a = predict(PredictSettings(checkpoint=old, images=demo_data / "test", out=tmp_path / "old.csv", **kwargs),
                progress=False)
    b = predict(PredictSettings(checkpoint=new, images=demo_data / "test", out=tmp_path / "new.csv", **kwargs),
                progress=False)
    assert a is not None and b is not None
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "old.csv"), pd.read_csv(tmp_path / "new.csv"),
                                  check_exact=True)

    evaluate(EvaluateSettings(checkpoint=old, out=tmp_path / "eval", data_path=str(demo_data), bootstrap=0,
                              device="cpu", num_workers=0), report=False)
    assert (tmp_path / "eval" / "metrics_test.json").is_file()

    pytest.importorskip("onnxruntime")
    from retinafm.settings import ExportSettings
    from retinafm.workflows.export import export

    export(ExportSettings(checkpoint=old, out=tmp_path / "old.onnx"))
    assert (tmp_path / "old.onnx").stat().st_size > 0

    target = create_model(get_spec("vit_micro_patch8"), 3, input_size=32, global_pool="avg")
    report = load_backbone_weights(target, str(old), "timm")  # --weights
    assert report.family == "retinafm"
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_format_1_checkpoint_last_resumes_bit_for_bit(demo_data, tmp_path, monkeypatch):
    from retinafm.workflows.finetune import finetune

    finetune(_finetune_settings(demo_data, tmp_path / "straight"))
    cfg = _finetune_settings(demo_data, tmp_path / "run")
    _interrupt_after_first_epoch(finetune, cfg, monkeypatch)
    rewrite_legacy(tmp_path / "run" / "checkpoint-last.pth")
    rewrite_legacy(tmp_path / "run" / "checkpoint-best.pth")
    cfg.resume = True
    finetune(cfg)
    _assert_same_log(tmp_path / "run", tmp_path / "straight")
    for name in ("checkpoint-last.pth", "checkpoint-best.pth"):
        _assert_same_weights(torch.load(tmp_path / "run" / name, weights_only=True)["model"],
                             torch.load(tmp_path / "straight" / name, weights_only=True)["model"])


def test_pretraining_and_refinement_files_are_not_models_to_predict_with(tmp_path):
    torch.save({"model": {}, "epoch": 0, "retinafm_pretrain": {"method": "mae"}}, tmp_path / "old.pth")
    torch.save({"model": {}, "retinafm": {"format": 2, "kind": "refine"}}, tmp_path / "new.pth")
    for name in ("old.pth", "new.pth"):
        with pytest.raises(CheckpointError, match="not a retinafm checkpoint"):
            load_checkpoint(tmp_path / name)


# --------------------------------------------------------------------------- pretraining ("retinafm_pretrain")
def _pretrain_settings(images: Path, out: Path, **overrides) -> PretrainSettings:
    settings = dict(out=str(out), images=str(images), model="vit_micro_patch8", input_size=32, epochs=2,
                    warmup_epochs=1, batch_size=16, lr=1e-3, decoder_dim=32, decoder_depth=1, decoder_heads=4,
                    reconstructions=0, num_workers=0, device="cpu", out_dim=32, local_crops=2, splits="val")
    settings.update(overrides)
    return PretrainSettings(**settings)


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_retinafm_pretrain_files_resume_and_load_as_weights_and_init(method, demo_data, tmp_path, monkeypatch):
    from retinafm.workflows.pretrain import pretrain

    def run(cfg):
        return pretrain(cfg, progress=False)

    straight = run(_pretrain_settings(demo_data, tmp_path / "straight", method=method))
    cfg = _pretrain_settings(demo_data, tmp_path / "run", method=method)
    _interrupt_after_first_epoch(run, cfg, monkeypatch)
    last = tmp_path / "run" / "checkpoint-last.pth"
    rewrite_legacy(last)
    assert "retinafm_pretrain" in torch.load(last, weights_only=True)
    cfg.resume = True
    run(cfg)
    _assert_same_log(tmp_path / "run", straight.run_dir)
    _assert_same_weights(open_checkpoint(last)["model"], open_checkpoint(straight.checkpoint)["model"])

    # --weights: the old file and the new one give the backbone the same tensors.
    old = tmp_path / "old.pth"
    torch.save(legacy(torch.load(straight.checkpoint, weights_only=True)), old)
    assert detect_family(read_checkpoint(old)) == detect_family(read_checkpoint(straight.checkpoint))
    a, b = (create_model(get_spec("vit_micro_patch8"), 3, input_size=32, global_pool="avg") for _ in range(2))
    load_backbone_weights(a, str(old), "timm")
    load_backbone_weights(b, str(straight.checkpoint), "timm")
    _assert_same_weights({k: v for k, v in a.state_dict().items() if not k.startswith(("head.", "fc_norm."))},
                         {k: v for k, v in b.state_dict().items() if not k.startswith(("head.", "fc_norm."))})

    # --init: lr 0 keeps what was loaded, which must be the file's encoder (and MAE's decoder).
    init = run(_pretrain_settings(demo_data, tmp_path / "init", method=method, init=str(old), lr=0.0, epochs=1,
                                  warmup_epochs=0))
    after = open_checkpoint(init.checkpoint)["model"]
    before = open_checkpoint(straight.checkpoint)["model"]
    key = "blocks.0.attn.qkv.weight" if method == "mae" else "student.backbone.blocks.0.attn.qkv.weight"
    source = key if method == "mae" else "teacher.backbone.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(after[key], before[source])
    if method == "mae":
        torch.testing.assert_close(after["decoder_pred.weight"], before["decoder_pred.weight"])


# --------------------------------------------------------------------------- refinement ("retinafm_refine")
def test_retinafm_refine_files_resume_and_export_the_backbone(tiny_text_model, tmp_path, monkeypatch):
    from retinafm.workflows.refine import export_backbone, refine

    pairs = write_report_pairs(tmp_path / "pairs", n_train=16, n_val=8, size=48, seed=0)

    def settings(out: Path) -> RefineSettings:
        return RefineSettings(out=str(out), pairs=str(pairs), model="vit_micro_patch8", weights="none", input_size=32,
                              text_model=str(tiny_text_model), epochs=2, warmup_epochs=1, batch_size=8, lr=1e-3,
                              embed_dim=16, max_length=32, num_workers=0, device="cpu")

    def run(cfg):
        return refine(cfg, progress=False)

    straight = run(settings(tmp_path / "straight"))
    cfg = settings(tmp_path / "run")
    _interrupt_after_first_epoch(run, cfg, monkeypatch)
    for name in ("checkpoint-last.pth", "checkpoint-best.pth"):
        rewrite_legacy(tmp_path / "run" / name)
    cfg.resume = True
    run(cfg)
    _assert_same_log(tmp_path / "run", straight.run_dir)
    _assert_same_weights(torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)["model"],
                         torch.load(straight.run_dir / "checkpoint-last.pth", weights_only=True)["model"])

    old = tmp_path / "old-best.pth"
    torch.save(legacy(torch.load(straight.run_dir / "checkpoint-best.pth", weights_only=True)), old)
    export_backbone(old, tmp_path / "old.safetensors")
    export_backbone(straight.run_dir / "checkpoint-best.pth", tmp_path / "new.safetensors")
    from safetensors.torch import load_file

    _assert_same_weights(load_file(tmp_path / "old.safetensors"), load_file(tmp_path / "new.safetensors"))
    # A refinement checkpoint, old or new, is also --weights: its vision tower.
    target = create_model(get_spec("vit_micro_patch8"), 0, input_size=32)
    report = load_backbone_weights(target, str(old), "timm")
    assert report.family == "retinafm_refine"
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight,
                               load_file(tmp_path / "new.safetensors")["blocks.0.attn.qkv.weight"])
