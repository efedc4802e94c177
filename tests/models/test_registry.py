"""The zoo: every entry builds (real size on the meta device, tiny size for forward/backward)."""
from __future__ import annotations

import pytest
import timm
import torch

from retinafm.models.registry import (
    ZOO,
    UnknownModelError,
    create_model,
    get_spec,
    zoo_table,
)

EXPECTED_PARAMS_M = {  # backbone parameters, millions (published sizes)
    "RETFound_mae_natureCFP": 303, "RETFound_dinov2_meh": 304, "dinov2_vits14": 22, "dinov2_vitg14": 1136,
    "dinov3_vits16": 21, "dinov3_vitl16": 303, "dinov3_vit7b16": 6716,
    "VisionFM_OCT": 86, "UrFound": 86, "RetFiner_RETFound": 303, "RetFiner_VisionFM": 86, "RetFiner_UrFound": 86,
}


def test_zoo_has_the_issue_entries():
    for name in ["RETFound_mae_natureCFP", "RETFound_mae_natureOCT", "RETFound_mae_meh", "RETFound_mae_shanghai",
                 "RETFound_dinov2_meh", "RETFound_dinov2_shanghai", "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
                 "dinov2_vitg14", "dinov3_vits16", "dinov3_vitsplus16", "dinov3_vitb16", "dinov3_vitl16",
                 "dinov3_vithplus16", "dinov3_vit7b16", "vit_tiny_patch16", "vit_small_patch16"]:
        assert name in ZOO
    spec = ZOO["RETFound_mae_natureCFP"]
    assert (spec.hf_repo, spec.hf_filename) == ("YukunZhou/RETFound_mae_natureCFP", "RETFound_mae_natureCFP.pth")
    assert spec.global_pool == "avg" and spec.modality == "CFP" and ZOO["RETFound_mae_natureOCT"].modality == "OCT"


def test_retfiner_visionfm_and_urfound_entries():
    for name in ["RetFiner_RETFound", "RetFiner_VisionFM", "RetFiner_UrFound"]:
        spec = ZOO[name]
        assert spec.family == "retfiner" and spec.modality == "OCT" and spec.licence == "CC-BY-NC-4.0"
        assert spec.hf_repo is None  # published as GitHub release assets, used with --weights PATH
        assert spec.weights_url == f"https://github.com/ronnief1/RetFiner/releases/download/weights/{name}.pth"
        assert "--weights PATH" in spec.description and spec.weights_url in spec.description
        assert spec.weight_source == "download, then --weights PATH"
    assert (ZOO["RetFiner_RETFound"].arch, ZOO["RetFiner_RETFound"].global_pool) == ("vit_large_patch16_224", "avg")
    assert (ZOO["RetFiner_UrFound"].arch, ZOO["RetFiner_UrFound"].global_pool) == ("vit_base_patch16_224", "avg")
    assert (ZOO["RetFiner_VisionFM"].arch, ZOO["RetFiner_VisionFM"].global_pool) == ("vit_base_patch16_224", "token")
    assert ZOO["RetFiner_VisionFM"].mean == ZOO["VisionFM_OCT"].mean  # refined with VisionFM's OCT statistics
    for modality, short in [("Fundus", "CFP"), ("OCT", "OCT")]:
        spec = ZOO[f"VisionFM_{modality}"]
        assert (spec.family, spec.modality, spec.global_pool, spec.hf_repo) == ("visionfm", short, "token", None)
        assert spec.weights_url.startswith("https://drive.google.com/") and spec.licence == "CC-BY-NC-4.0"
    assert ZOO["VisionFM_OCT"].mean == (0.21091926, 0.21091926, 0.21091919)
    spec = ZOO["UrFound"]
    assert (spec.hf_repo, spec.hf_filename, spec.family, spec.global_pool) == ("yyyyk/UrFound", "urfound_mm.pth",
                                                                           "urfound", "avg")
    assert spec.weight_source == "hf:yyyyk/UrFound" and spec.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS_M))
def test_real_size_architectures_build_on_meta_device(name):
    spec = ZOO[name]
    with torch.device("meta"):
        model = create_model(spec, num_classes=0)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - EXPECTED_PARAMS_M[name]) / EXPECTED_PARAMS_M[name] < 0.03, n
    assert model.patch_embed.patch_size == (spec.patch_size, spec.patch_size)


def test_retfound_architecture_has_retfound_key_names():
    with torch.device("meta"):
        model = create_model(ZOO["RETFound_mae_natureCFP"], num_classes=5)
    keys = set(model.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.23.attn.qkv.weight",
            "blocks.23.mlp.fc2.weight", "fc_norm.weight", "head.weight"} <= keys
    assert "norm.weight" not in keys  # global pool replaces the final norm with fc_norm
    assert model.pos_embed.shape == (1, 197, 1024)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_entry_runs_forward_and_backward_at_tiny_size(name):
    spec = ZOO[name]
    tiny = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    size = spec.patch_size * 2
    kwargs = {**spec.arch_kwargs, **tiny, "num_classes": 3, "img_size": size, "pretrained": False}
    if spec.global_pool:
        kwargs["global_pool"] = spec.global_pool
    model = timm.create_model(spec.arch, **kwargs)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None


def test_dinov2_is_built_at_the_requested_size_not_518():
    with torch.device("meta"):
        model = create_model(ZOO["dinov2_vitl14"], num_classes=2)
    assert model.patch_embed.img_size == (224, 224)
    assert model.pos_embed.shape[1] == 1 + 16 * 16


def test_any_timm_name_and_unknown_names():
    spec = get_spec("vit_small_patch14_dinov2")
    assert spec.family == "dinov2" and spec.patch_size == 14 and spec.input_size == 224
    assert get_spec("retfound_mae_natureCFP").name == "RETFound_mae_natureCFP"  # case-insensitive
    with pytest.raises(UnknownModelError, match="unknown model"):
        get_spec("RETFound_mae_nonexistent")


def test_zoo_table_columns():
    rows = zoo_table()
    assert set(rows[0]) == {"name", "architecture", "input", "modality", "weights", "licence"}
    assert len(rows) == len(ZOO)
