"""`retinafm import --from retfound`: checkpoints of RETFound's main_finetune.py give identical outputs here."""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import torch.nn as nn
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from retinafm.cli import main
from retinafm.engine.checkpoint import load_checkpoint
from retinafm.engine.inference import model_from_checkpoint
from retinafm.settings import PredictSettings
from retinafm.workflows.import_ import (
    RetfoundImportError,
    _dinov2_layout,
    _mae_layout,
    import_retfound,
)
from retinafm.workflows.predict import predict

CLASSES = ["AMD", "DR", "normal"]
TINY = dict(patch_size=16, embed_dim=128, depth=2, num_heads=2, mlp_ratio=4, qkv_bias=True)


class RetfoundStyleViT(VisionTransformer):
    """The forward of RETFound's models_vit.VisionTransformer, written from its description.

    global_pool: the final norm is removed and fc_norm normalises the mean of the patch tokens;
    otherwise the final norm and the class token. `timm09_head`: under timm 0.9 (RETFound's 2025
    code) the inherited forward_head applies fc_norm a second time before the head.
    """

    def __init__(self, global_pool: bool, timm09_head: bool, **kwargs):
        super().__init__(norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
        self.retfound_pool, self.timm09_head = global_pool, timm09_head
        if global_pool:
            self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
            del self.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self._pos_embed(self.patch_embed(x)))
        if self.retfound_pool:
            features = self.fc_norm(x[:, 1:].mean(dim=1))
            if self.timm09_head:
                features = self.fc_norm(features)
        else:
            features = self.norm(x)[:, 0]
        return self.head(features)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norms and head: LayerNorm with unit weight and zero bias is idempotent, which
    would hide a missing or extra normalisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _save_retfound(path: Path, network: nn.Module, **args) -> Path:
    """As RETFound's misc.save_model writes checkpoint-best.pth."""
    settings = dict(nb_classes=len(CLASSES), drop_path=0.2, task="demo", output_dir="./output", blr=5e-3)
    torch.save({"model": network.state_dict(), "epoch": 41, "args": argparse.Namespace(**settings, **args)}, path)
    return path


def _imported(path: Path) -> nn.Module:
    model, _ = model_from_checkpoint(load_checkpoint(path))
    return model


@pytest.mark.parametrize("name,global_pool,repeats", [
    ("RETFound_mae", True, 2),  # 2025 code, timm 0.9
    ("vit_large_patch16", True, 1),  # 2023 code, timm 0.3.2
    ("RETFound_mae", False, 1),  # --cls_token
])
def test_mae_variants_give_retfounds_outputs(name, global_pool, repeats, tmp_path):
    reference = _randomise(RetfoundStyleViT(global_pool, timm09_head=name == "RETFound_mae", img_size=32,
                                            num_classes=3, **TINY), seed=1)
    ckpt = _save_retfound(tmp_path / "checkpoint-best.pth", reference, model=name, input_size=32,
                          global_pool=global_pool)
    result = import_retfound(ckpt, CLASSES, tmp_path / "imported.pth")
    assert (result.arch, result.class_names, result.input_size) == ("vit_large_patch16_224", CLASSES, 32)

    state = load_checkpoint(result.out)
    meta = state["retinafm"]
    assert meta["fc_norm_repeats"] == repeats and meta["global_pool"] == ("avg" if global_pool else "token")
    assert meta["arch_kwargs"] == {"embed_dim": 128, "depth": 2, "num_heads": 2}
    assert meta["eval_crop_pct"] == pytest.approx(0.875) and meta["epoch"] == 41
    assert meta["settings"]["retfound_args"]["model"] == name and meta["task_state"]["selection_metric"]
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_imported(result.out)(images), reference(images), rtol=1e-5, atol=1e-5)


def test_the_second_fc_norm_matters(tmp_path):
    """Importing a 2025 checkpoint as if it were 2023 code would give other outputs: the test above can fail."""
    kwargs = dict(img_size=32, num_classes=3, **TINY)
    twice = _randomise(RetfoundStyleViT(True, timm09_head=True, **kwargs), seed=2)
    once = RetfoundStyleViT(True, timm09_head=False, **kwargs).eval()
    once.load_state_dict(twice.state_dict())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (twice(images) - once(images)).abs().max() > 1e-2
        ckpt = _save_retfound(tmp_path / "c.pth", twice, model="RETFound_mae", input_size=32, global_pool=True)
        imported = _imported(import_retfound(ckpt, CLASSES, tmp_path / "i.pth").out)
        torch.testing.assert_close(imported(images), twice(images), rtol=1e-5, atol=1e-5)


def test_dinov2_variant(tmp_path):
    reference = _randomise(timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, num_classes=3,
                                             embed_dim=128, depth=2, num_heads=2), seed=3)
    ckpt = _save_retfound(tmp_path / "d.pth", reference, model="RETFound_dinov2", input_size=28, global_pool=True)
    result = import_retfound(ckpt, CLASSES, tmp_path / "i.pth")
    meta = load_checkpoint(result.out)["retinafm"]
    assert (result.arch, result.input_size, meta["global_pool"]) == ("vit_large_patch14_dinov2", 28, "token")
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_imported(result.out)(images), reference(images), rtol=1e-5, atol=1e-5)


def test_real_size_layouts_map_to_plain_timm_architectures():
    """ViT-L shapes (on the meta device: no memory, no download) need no architecture overrides."""
    with torch.device("meta"):
        mae = timm.create_model("vit_large_patch16_224", global_pool="avg", num_classes=5).state_dict()
        dino = timm.create_model("vit_large_patch14_dinov2", img_size=224, num_classes=5).state_dict()
    layout, variant = _mae_layout(mae, "RETFound_mae", Path("checkpoint-best.pth"))
    assert layout == dict(arch="vit_large_patch16_224", arch_kwargs={}, input_size=224, global_pool="avg",
                          patch_size=16, fc_norm_repeats=2)
    assert variant == "RETFound_mae, global average pool"
    assert _dinov2_layout(dino, Path("c.pth")) == dict(arch="vit_large_patch14_dinov2", arch_kwargs={}, input_size=224,
                                                       global_pool="token", patch_size=14, fc_norm_repeats=1)


def test_large_inputs_use_retfounds_full_crop(tmp_path):
    reference = _randomise(RetfoundStyleViT(True, timm09_head=True, img_size=240, num_classes=3, **TINY), seed=4)
    ckpt = _save_retfound(tmp_path / "c.pth", reference, model="RETFound_mae", input_size=240, global_pool=True)
    meta = load_checkpoint(import_retfound(ckpt, CLASSES, tmp_path / "i.pth").out)["retinafm"]
    assert meta["input_size"] == 240 and meta["eval_crop_pct"] == 1.0


@pytest.fixture
def retfound_checkpoint(tmp_path) -> Path:
    model = _randomise(RetfoundStyleViT(True, timm09_head=True, img_size=32, num_classes=3, **TINY), seed=5)
    return _save_retfound(tmp_path / "checkpoint-best.pth", model, model="RETFound_mae", input_size=32,
                          global_pool=True)


def test_command_line_and_predict(retfound_checkpoint, demo_data, tmp_path):
    out = tmp_path / "retfound_dr.pth"
    res = CliRunner().invoke(main, ["import", str(retfound_checkpoint), "--from", "retfound", "--classes",
                                    "AMD, DR, normal", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 classes: AMD, DR, normal" in res.output and "input 32px" in res.output
    again = CliRunner().invoke(main, ["import", str(retfound_checkpoint), "--from", "retfound", "--classes",
                                      "AMD,DR,normal", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output

    preds = predict(PredictSettings(checkpoint=out, images=demo_data / "test", out=tmp_path / "p.csv", num_workers=0),
                                    progress=False).predictions
    assert list(preds.columns) == ["path", "prediction", "prob_AMD", "prob_DR", "prob_normal"]
    assert len(preds) == 24 and preds[["prob_AMD", "prob_DR", "prob_normal"]].sum(axis=1).round(5).eq(1).all()
    assert list(pd.read_csv(tmp_path / "p.csv").columns)[0] == "path"


def test_bad_inputs_are_explained(retfound_checkpoint, tmp_path):
    with pytest.raises(RetfoundImportError, match="names 2 class.*has 3 outputs"):
        import_retfound(retfound_checkpoint, ["DR", "normal"], tmp_path / "a.pth")
    with pytest.raises(RetfoundImportError, match="duplicate"):
        import_retfound(retfound_checkpoint, ["DR", "DR", "normal"], tmp_path / "b.pth")

    pretrained = tmp_path / "RETFound_mae_natureCFP.pth"
    state = torch.load(retfound_checkpoint, weights_only=False)
    torch.save({"model": {k: v for k, v in state["model"].items() if not k.startswith("head.")}}, pretrained)
    with pytest.raises(RetfoundImportError, match="retinafm finetune --weights"):
        import_retfound(pretrained, CLASSES, tmp_path / "c.pth")

    other = tmp_path / "resnet.pth"
    torch.save({"model": state["model"], "args": argparse.Namespace(model="resnet50")}, other)
    with pytest.raises(RetfoundImportError, match="trained as 'resnet50'"):
        import_retfound(other, CLASSES, tmp_path / "d.pth")

    res = CliRunner().invoke(main, ["import", str(tmp_path / "a.txt"), "--from", "retfound", "--classes", "a",
                                    "--out", str(tmp_path / "e.pth")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    res = CliRunner().invoke(main, ["import", str(tmp_path / "notes.pth"), "--from", "retfound", "--classes",
                                    "a,b,c", "--out", str(tmp_path / "f.pth")])
    assert res.exit_code == 2 and "cannot be opened safely" in res.output and "Traceback" not in res.output
