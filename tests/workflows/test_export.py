"""`export`: an ONNX file that predict and embed run like the checkpoint it came from."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx  # noqa: E402  (a test dependency: `pip install -e .[test]` brings it and onnxruntime)
import pandas as pd
import pytest
import torch

from retinafm.data.embeddings import read_embeddings
from retinafm.engine.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
)
from retinafm.engine.inference import load_onnx, model_from_checkpoint
from retinafm.files import OutputExistsError
from retinafm.models.heads import HeadSettings
from retinafm.models.onnx import META_KEY, OnnxModel
from retinafm.models.registry import create_model, get_spec
from retinafm.settings import EmbedSettings, EvaluateSettings, ExportSettings, PredictSettings
from retinafm.workflows.embed import embed
from retinafm.workflows.evaluate import evaluate
from retinafm.workflows.export import export
from retinafm.workflows.predict import predict

CLASSES = ["normal", "diabetic_retinopathy", "glaucoma"]
SIZE = 32


def _checkpoint(path: Path, head: HeadSettings | None = None, **meta_overrides) -> Path:
    """A 3-class vit_micro checkpoint whose (linear) head is scaled up so the classes get distinct probabilities."""
    spec = get_spec("vit_micro_patch8")
    torch.manual_seed(0)
    model = create_model(spec, len(CLASSES), input_size=SIZE, global_pool="avg", head=head)
    if head is None:
        with torch.no_grad():
            model.head.weight.normal_(0, 0.5)
        meta_overrides["head"] = {}
    else:
        meta_overrides["head"] = dict(head.__dict__)
    meta = dict(model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), task="multiclass",
                class_names=CLASSES, input_size=SIZE, mean=list(spec.mean), std=list(spec.std), global_pool="avg",
                modality="any", patch_size=spec.patch_size, settings={"epochs": 1})
    meta.update(meta_overrides)
    return save_checkpoint(path, model, CheckpointMeta(**meta))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """The checkpoint, its fp32 and int8 exports, and a dozen synthetic fundus images."""
    from retinafm.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("export")
    pth = _checkpoint(root / "checkpoint-best.pth")
    fp32 = export(ExportSettings(checkpoint=pth, out=root / "model.onnx"))
    int8 = export(ExportSettings(checkpoint=pth, out=root / "model-int8.onnx", int8=True))
    assert fp32.max_abs_diff_logits < 1e-4 and fp32.max_abs_diff_features < 1e-4 and not fp32.int8
    assert int8.int8 and int8.out.is_file()
    images = write_demo_dataset(root / "data", n_train=0, n_val=0, n_test=4, size=64, seed=0) / "test"
    return {"pth": pth, "onnx": fp32.out, "int8": int8.out, "images": images}


def _probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"prob_{c}" for c in CLASSES]].to_numpy()


def test_the_file_carries_the_checkpoint_metadata_and_its_outputs(exported):
    proto = onnx.load(str(exported["onnx"]))
    info = json.loads({p.key: p.value for p in proto.metadata_props}[META_KEY])
    assert info["class_names"] == CLASSES and info["input_size"] == SIZE and info["export"]["int8"] is False
    assert {"torch", "onnx", "onnxruntime"} <= set(info["versions"])
    model, meta = load_onnx(exported["onnx"])
    assert isinstance(model, OnnxModel) and meta.class_names == CLASSES and meta.input_size == SIZE
    assert str(model.global_pool) == "avg" and meta.task == "multiclass"

    torch_model, _ = model_from_checkpoint(load_checkpoint(exported["pth"]))
    for batch in (1, 5):  # exported with a batch of 2: the batch dimension is free
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            logits = torch_model(x)
            features = torch_model.forward_head(torch_model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.features(x), features, atol=1e-4, rtol=0)


def test_predict_and_embed_from_the_export_match_the_checkpoint(exported, tmp_path):
    run = dict(num_workers=0, device="cpu", batch_size=5)
    ours = predict(PredictSettings(checkpoint=exported["onnx"], images=exported["images"], out=tmp_path / "onnx.csv",
                                   **run), progress=False).predictions
    ref = predict(PredictSettings(checkpoint=exported["pth"], images=exported["images"], out=tmp_path / "pth.csv",
                                  **run), progress=False).predictions
    assert list(ours.columns) == list(ref.columns) == ["path", "prediction"] + [f"prob_{c}" for c in CLASSES]
    assert len(ours) == 12 and ours["path"].tolist() == ref["path"].tolist()
    np.testing.assert_allclose(_probs(ours), _probs(ref), atol=1e-4)
    assert _probs(ref).max() - _probs(ref).min() > 0.1  # the comparison is not between flat outputs
    assert (ours["prediction"] == ref["prediction"]).all()

    for tta in (False, True):
        settings = dict(num_workers=0, device="cpu", dtype="float32", batch_size=5, tta_flip=tta)
        a = embed(exported["images"], tmp_path / f"onnx{tta}.parquet",
                  EmbedSettings(checkpoint=str(exported["onnx"]), **settings), progress=False)
        b = embed(exported["images"], tmp_path / f"pth{tta}.parquet",
                  EmbedSettings(checkpoint=str(exported["pth"]), **settings), progress=False)
        ea, eb = read_embeddings(a.out), read_embeddings(b.out)
        assert ea.frame["path"].tolist() == eb.frame["path"].tolist() and ea.vectors.shape == (12, 64)
        np.testing.assert_allclose(ea.vectors, eb.vectors, atol=1e-4)
        assert ea.info["pool"] == eb.info["pool"] == "avg" and ea.info["tta_flip"] is tta


def test_evaluate_runs_the_export_with_the_checkpoint_s_metrics(exported, tmp_path):
    data = exported["images"]  # <class>/<image>, taken as the test split
    run = dict(data_path=str(data), bootstrap=0, num_workers=0, device="cpu", batch_size=5)
    ours = evaluate(EvaluateSettings(checkpoint=exported["onnx"], out=tmp_path / "onnx", **run), report=False)
    ref = evaluate(EvaluateSettings(checkpoint=exported["pth"], out=tmp_path / "pth", **run), report=False)
    assert ours.paths == ref.paths and len(ours.paths) == 12
    np.testing.assert_array_equal(ours.targets, ref.targets)
    np.testing.assert_allclose(ours.outputs, ref.outputs, atol=1e-4)
    assert ours.metrics.keys() == ref.metrics.keys()
    for name, value in ref.metrics.items():  # threshold-free metrics move by at most the outputs' tolerance
        assert ours.metrics[name] == pytest.approx(value, abs=1e-3, nan_ok=True), name
    assert ours.loss == pytest.approx(ref.loss, abs=1e-4)
    saved = json.loads((tmp_path / "onnx" / "metrics_test.json").read_text())
    assert saved["accuracy"] == pytest.approx(ref.metrics["accuracy"])
    with pytest.raises(ValueError, match="--precision bf16: .* is an ONNX model"):
        evaluate(EvaluateSettings(checkpoint=exported["onnx"], out=tmp_path / "bf16", **{**run, "precision": "bf16"}),
                 report=False)
    with pytest.raises(ValueError, match="retinafm export --int8"):
        evaluate(EvaluateSettings(checkpoint=exported["onnx"], out=tmp_path / "int8", **{**run, "cpu_int8": True}),
                 report=False)


def test_int8_export_stays_close_to_fp32(exported, tmp_path):
    run = dict(num_workers=0, device="cpu")
    fp32 = predict(PredictSettings(checkpoint=exported["onnx"], images=exported["images"], out=tmp_path / "fp32.csv",
                                   **run), progress=False).predictions
    int8 = predict(PredictSettings(checkpoint=exported["int8"], images=exported["images"], out=tmp_path / "int8.csv",
                                   **run), progress=False).predictions
    assert list(int8.columns) == list(fp32.columns) and int8["path"].tolist() == fp32["path"].tolist()
    # Observed up to 0.022 on this model; a ViT-B/16 with random weights moved by up to 0.06.
    np.testing.assert_allclose(_probs(int8), _probs(fp32), atol=0.05)
    _, meta = load_onnx(exported["int8"])
    assert meta.class_names == CLASSES


def test_a_flip_averaged_probe_exports_its_averaged_logits(tmp_path):
    pth = _checkpoint(tmp_path / "probe.pth", tta_flip=True)
    result = export(ExportSettings(checkpoint=pth, out=tmp_path / "probe.onnx"))
    assert result.max_abs_diff_logits < 1e-4
    model, meta = load_onnx(result.out)
    torch_model, _ = model_from_checkpoint(load_checkpoint(pth))
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        averaged = torch_model(x)
        plain = torch_model.forward_head(torch_model.forward_features(x))
    assert meta.tta_flip and (averaged - plain).abs().max() > 1e-3  # the flip matters for this input
    torch.testing.assert_close(model(x), averaged, atol=1e-4, rtol=0)


def test_a_transformer_head_exports(tmp_path):
    """Under no_grad nn.TransformerEncoder takes a fused fast path that ONNX cannot express."""
    pth = _checkpoint(tmp_path / "head.pth", head=HeadSettings(kind="transformer", depth=1))
    result = export(ExportSettings(checkpoint=pth, out=tmp_path / "head.onnx"))
    assert result.max_abs_diff_logits < 1e-4 and result.max_abs_diff_features < 1e-4
    assert torch.backends.mha.get_fastpath_enabled()  # switched off for the export only


def test_clear_errors(exported, tmp_path, monkeypatch):
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(ExportSettings(checkpoint=exported["pth"], out=exported["onnx"]))
    with pytest.raises(ValueError, match=r"\.onnx"):
        export(ExportSettings(checkpoint=exported["pth"], out=tmp_path / "model.pth"))
    with pytest.raises(CheckpointError, match="already an ONNX model"):
        export(ExportSettings(checkpoint=exported["onnx"], out=tmp_path / "again.onnx"))

    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"this is not a model")
    with pytest.raises(CheckpointError, match="cannot be opened as an ONNX model.*`retinafm export`"):
        predict(PredictSettings(checkpoint=fake, images=exported["images"], out=tmp_path / "p.csv", num_workers=0,
                                device="cpu"))
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX model that retinafm did not write
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), foreign)
    with pytest.raises(CheckpointError, match="not one `retinafm export` wrote"):
        load_onnx(foreign)
    with pytest.raises(CheckpointError, match="no such file"):
        load_onnx(tmp_path / "missing.onnx")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
        with pytest.raises(CheckpointError, match=r"needs ONNX Runtime.*retinafm\[onnx\]"):
            load_onnx(exported["onnx"])

    with pytest.raises(ValueError, match="retinafm export --int8"):
        predict(PredictSettings(checkpoint=exported["onnx"], images=exported["images"], out=tmp_path / "p.csv",
                                num_workers=0, cpu_int8=True))
    with pytest.raises(ValueError, match="--device cpu"):
        predict(PredictSettings(checkpoint=exported["onnx"], images=exported["images"], out=tmp_path / "p.csv",
                                num_workers=0, device="cuda"))
    with pytest.raises(ValueError, match="retinafm export --int8"):
        embed(exported["images"], tmp_path / "e.parquet",
              EmbedSettings(checkpoint=str(exported["onnx"]), cpu_int8=True, num_workers=0), progress=False)
    with pytest.raises(ValueError, match="--precision bf16: .* is an ONNX model"):
        predict(PredictSettings(checkpoint=exported["onnx"], images=exported["images"], out=tmp_path / "p.csv",
                                num_workers=0, precision="bf16"))
    with pytest.raises(ValueError, match="--precision bf16: .* is an ONNX model"):
        embed(exported["images"], tmp_path / "e.parquet",
              EmbedSettings(checkpoint=str(exported["onnx"]), precision="bf16", num_workers=0), progress=False)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "e.parquet").exists()


def test_cli_export_then_predict(exported, tmp_path):
    from click.testing import CliRunner

    from retinafm.cli import main

    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(main, ["export", "--checkpoint", str(exported["pth"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "written to" in res.output and "max |ONNX Runtime - PyTorch|" in res.output
    again = CliRunner().invoke(main, ["export", "--checkpoint", str(exported["pth"]), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    res = CliRunner().invoke(main, ["predict", "--checkpoint", str(out), "--images", str(exported["images"]),
                                    "--out", str(tmp_path / "p.csv"), "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 12


def test_a_probe_on_onnx_embeddings_is_refused_with_a_reason(exported, tmp_path):
    from retinafm.engine.features import backbone_fields

    with pytest.raises(CheckpointError, match="ONNX export.*embed with the .pth"):
        backbone_fields({"checkpoint": str(exported["onnx"])})
