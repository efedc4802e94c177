"""Pretrained-weight loading: each family's key layout, built tiny, must give the same features as
the timm model built from the same tensors; bad files fail loudly and safely."""
from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from retinafm.models.registry import ModelSpec, create_model, get_spec
from retinafm.models.weights import (
    WeightsError,
    detect_family,
    load_backbone_weights,
    read_checkpoint,
    resolve_weights,
)

MICRO = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _source_vit(global_pool: str = "token", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                          global_pool=global_pool, **{**MICRO, **kw})
    # Non-trivial norms so a dropped or misplaced norm would show in the features.
    for name, p in m.named_parameters():
        if "norm" in name:
            p.data.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return m


def _mae_checkpoint(src: torch.nn.Module) -> dict:
    """RETFound-MAE pretraining file: encoder + mask token + decoder under 'model', plus MAE extras."""
    sd = dict(src.state_dict())
    d = 16
    sd["mask_token"] = torch.zeros(1, 1, d)
    sd["decoder_embed.weight"] = torch.randn(d, 32)
    sd["decoder_embed.bias"] = torch.zeros(d)
    sd["decoder_pos_embed"] = torch.zeros(1, 17, d)
    sd["decoder_blocks.0.norm1.weight"] = torch.ones(d)
    sd["decoder_blocks.0.attn.qkv.weight"] = torch.randn(3 * d, d)
    sd["decoder_norm.weight"] = torch.ones(d)
    sd["decoder_pred.weight"] = torch.randn(8 * 8 * 3, d)
    return {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
            "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_large_patch16", norm_pix_loss=True)}


def test_retfound_mae_layout_loads_with_only_head_and_fc_norm_missing(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "RETFound_mae_natureCFP.pth"
    torch.save(_mae_checkpoint(src), path)
    spec = ModelSpec(name="t", arch="vit_tiny_patch16_224", input_size=32, patch_size=8, family="retfound_mae",
                     global_pool="avg", arch_kwargs=MICRO)
    model = create_model(spec, num_classes=3)
    report = load_backbone_weights(model, str(path), "retfound_mae")
    assert report.family == "retfound_mae"
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert "norm.weight" in report.dropped  # the pretraining norm gives way to fc_norm (RETFound)
    for k, v in src.state_dict().items():
        if not k.startswith("norm."):
            torch.testing.assert_close(model.state_dict()[k], v)
    head_before = model.head.weight.detach().clone()
    load_backbone_weights(model, str(path), "retfound_mae")  # loading never touches the task head
    assert torch.equal(model.head.weight, head_before)


def test_mae_features_equal_timm_model_built_from_same_tensors(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "mae.pth"
    torch.save(_mae_checkpoint(src), path)
    spec = ModelSpec(name="t", arch="vit_tiny_patch16_224", input_size=32, patch_size=8, global_pool="token",
                     arch_kwargs=MICRO)
    model = create_model(spec, num_classes=2)
    load_backbone_weights(model, str(path), "retfound_mae")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(model, x), _features(src, x))


def test_position_embeddings_are_resampled_for_another_input_size(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "mae.pth"
    torch.save(_mae_checkpoint(src), path)
    spec = ModelSpec(name="t", arch="vit_tiny_patch16_224", input_size=48, patch_size=8, arch_kwargs=MICRO)
    model = create_model(spec, num_classes=2, input_size=48)
    load_backbone_weights(model, str(path), "retfound_mae")
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 32)
    expected = timm.layers.resample_abs_pos_embed(src.pos_embed.detach(), new_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)


def _dinov2_source(**kw) -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28,
                             patch_size=14, embed_dim=32, depth=4, num_heads=2, **kw)


def _to_meta_dinov2(sd: dict, chunks: int = 0, swiglu: bool = False) -> dict:
    out = {}
    for k, v in sd.items():
        if swiglu:
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        if chunks and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // chunks}.{i}." + k.split(".", 2)[2]
        out[k] = v
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def test_retfound_dinov2_teacher_layout(tmp_path: Path):
    src = _dinov2_source()
    teacher = {f"backbone.{k}": v for k, v in _to_meta_dinov2(src.state_dict(), chunks=2).items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, 32)
    teacher["ibot_head.last_layer.weight_g"] = torch.randn(1, 8)
    path = tmp_path / "RETFound_dinov2_meh.pth"
    torch.save({"teacher": teacher, "student": {}, "iteration": 100}, path)
    spec = ModelSpec(name="t", arch="vit_small_patch14_dinov2", input_size=28, patch_size=14, family="retfound_dinov2",
                     arch_kwargs=dict(embed_dim=32, depth=4, num_heads=2))
    model = create_model(spec, num_classes=4)
    report = load_backbone_weights(model, str(path), "retfound_dinov2")
    assert report.family == "retfound_dinov2"
    assert set(report.missing) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(_features(model, x), _features(src, x))


def test_dinov2_swiglu_names_are_mapped(tmp_path: Path):
    from timm.layers import SwiGLUPacked

    src = _dinov2_source(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.0)
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save(_to_meta_dinov2(src.state_dict(), swiglu=True), path)
    assert detect_family(read_checkpoint(path)) == "dinov2"
    spec = ModelSpec(name="t", arch="vit_small_patch14_dinov2", input_size=28, patch_size=14, family="dinov2",
                     arch_kwargs=dict(embed_dim=32, depth=4, num_heads=2, mlp_layer=SwiGLUPacked,
                                      act_layer=torch.nn.SiLU, mlp_ratio=2.0))
    model = create_model(spec, num_classes=2)
    load_backbone_weights(model, str(path), "dinov2")
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(_features(model, x), _features(src, x))


def test_meta_dinov3_layout(tmp_path: Path):
    torch.manual_seed(2)
    kw = dict(embed_dim=32, depth=2, num_heads=2)
    src = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, img_size=32, **kw)
    meta = {}
    for k, v in src.state_dict().items():
        if k.endswith("attn.q_bias"):
            v_bias = src.state_dict()[k.replace("q_bias", "v_bias")]
            meta[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
            continue
        if k.endswith("attn.v_bias") or "rope" in k:
            continue
        renamed = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        meta[renamed.replace("reg_token", "storage_tokens")] = v
    meta["mask_token"] = torch.zeros(1, 32)
    meta["rope_embed.periods"] = torch.ones(4)
    for i in range(2):
        meta[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(96)
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(meta, path)
    # timm default pool, as src
    spec = ModelSpec(name="t", arch="vit_small_patch16_dinov3_qkvb", input_size=32, family="dinov3", arch_kwargs=kw)
    model = create_model(spec, num_classes=3)
    report = load_backbone_weights(model, str(path), "dinov3")
    assert report.family == "dinov3"
    assert set(report.missing) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(model, x), _features(src, x))


def _ibot_head(prefix: str) -> dict:
    """iBOT's projection head: an MLP and weight-normed last layers; 'last_layer2' (patch tokens) is always
    there, a second name for 'last_layer' when the head is shared."""
    return {f"{prefix}mlp.0.weight": torch.randn(16, 32), f"{prefix}mlp.0.bias": torch.zeros(16),
            f"{prefix}last_layer.weight_g": torch.ones(64, 1), f"{prefix}last_layer.weight_v": torch.randn(64, 8),
            f"{prefix}last_layer2.weight_g": torch.ones(64, 1), f"{prefix}last_layer2.weight_v": torch.randn(64, 8)}


def _visionfm_checkpoint(src: torch.nn.Module) -> dict:
    """VisionFM's main_pretrain.py file: the EMA teacher (MultiCropWrapper: 'backbone.' + iBOT 'head.'), the
    DDP student (with iBOT's mask token 'masked_embed'), optimizer, args and the iBOT loss centres."""
    backbone = src.state_dict()
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | _ibot_head("head.")
    student = {f"module.backbone.{k}": v + 1.0 for k, v in backbone.items()}  # differs: the teacher must win
    student["module.backbone.masked_embed"] = torch.zeros(1, 32)
    student |= _ibot_head("module.head.")
    return {"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 400,
            "args": argparse.Namespace(arch="vit_base", patch_size=16, modality="OCT", shared_head=True),
            "ibot_loss": {"center": torch.zeros(1, 64), "center2": torch.zeros(1, 1, 64)},
            "fp16_scaler": {"scale": 65536.0}}


def _urfound_checkpoint(src: torch.nn.Module) -> dict:
    """UrFound's main_pretrain_urfound.py file: the MAE layout under 'model' plus its report branch, a BERT
    masked-LM ('bert_encoder.model.') fed through 'bert_mlp'."""
    ckpt = _mae_checkpoint(src)
    ckpt["model"].update({
        "bert_encoder.model.bert.embeddings.word_embeddings.weight": torch.randn(30, 8),
        "bert_encoder.model.bert.encoder.layer.0.crossattention.self.query.weight": torch.randn(8, 8),
        "bert_encoder.model.cls.predictions.bias": torch.zeros(30),
        "bert_mlp.weight": torch.randn(12, 32), "bert_mlp.bias": torch.zeros(12),
    })
    return ckpt


def _retfiner_encoder(src: torch.nn.Module, *, proj: bool, head: bool) -> dict:
    """What RetFiner's get_vision_backbone_for_linprobing.py saves (and its releases hold): the refinement
    model's vision encoder, 'model.vision_encoder.' cut off, flat. RETFound's encoder (RetFiner's vit.py)
    keeps its final norm, a 2-class head and 'proj' to the text width; VisionFM's has neither head nor proj."""
    sd = dict(src.state_dict())
    if head:
        sd |= {"head.weight": torch.randn(2, 32), "head.bias": torch.zeros(2)}
    if proj:
        sd |= {"proj.weight": torch.randn(24, 32), "proj.bias": torch.zeros(24)}
    return sd


def _retfiner_lightning(src: torch.nn.Module) -> dict:
    """RetFiner's train.py checkpoint (Lightning): the whole refinement model under 'state_dict'."""
    sd = {f"model.vision_encoder.{k}": v for k, v in _retfiner_encoder(src, proj=True, head=True).items()}
    sd |= {"model.multimodal_encoder.bert.embeddings.word_embeddings.weight": torch.randn(30, 8),
           "model.multimodal_encoder.cls.predictions.bias": torch.zeros(30),
           "model.contra_head_t.linear.weight": torch.randn(8, 8),
           "model.contra_head_v.linear.weight": torch.randn(8, 24),
           "model.itm_head.linear1.weight": torch.randn(8, 8), "model.contra_temp": torch.tensor(0.07)}
    return {"state_dict": sd, "epoch": 4, "global_step": 1000, "pytorch-lightning_version": "2.4.0",
            "optimizer_states": [{"state": {}, "param_groups": []}], "lr_schedulers": []}


def _micro(name: str, **kw) -> ModelSpec:
    """A zoo entry (family, pooling) at the micro size of the test checkpoints."""
    return dataclasses.replace(get_spec(name), input_size=32, patch_size=8, arch_kwargs=MICRO, **kw)


def test_visionfm_ibot_layout_is_recognised_and_loads_the_teacher(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "VFM_OCT_weights.pth"
    torch.save(_visionfm_checkpoint(src), path)
    assert detect_family(read_checkpoint(path)) == "visionfm"  # from the file alone
    model = create_model(_micro("VisionFM_OCT"), num_classes=3)
    report = load_backbone_weights(model, str(path), "timm")
    assert report.family == "visionfm"
    assert set(report.missing) == {"head.weight", "head.bias"}  # CLS token after VisionFM's own final norm
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(model, x), _features(src, x))


def test_teacher_checkpoints_tell_ibot_from_dinov2_and_retinafm_dino():
    teacher = {f"backbone.{k}": v for k, v in _source_vit("token").state_dict().items()}
    assert detect_family({"teacher": teacher | _ibot_head("head.")}) == "visionfm"  # iBOT's last_layer2
    assert detect_family({"teacher": teacher}, "visionfm") == "visionfm"  # no marker: the zoo label decides
    assert detect_family({"teacher": teacher}) == "retfound_dinov2"  # which reads a bare backbone the same way
    dinov2 = teacher | {"dino_head.mlp.0.weight": torch.randn(8, 32), "ibot_head.mlp.0.weight": torch.randn(8, 32)}
    assert detect_family({"teacher": dinov2, "student": {}}, "visionfm") == "retfound_dinov2"
    # `retinafm pretrain --method dino` (here on a VisionFM entry) stays with the retfound_dinov2 adapter.
    head = {"head.mlp.0.weight": torch.randn(8, 32),
            "head.last_layer.parametrizations.weight.original0": torch.ones(4, 1)}
    ours = {"student": teacher | head, "teacher": teacher | head, "dino_loss": {"center": torch.zeros(1, 4)},
            "optimizer": {}, "epoch": 1, "retinafm_pretrain": {"method": "dino"}}
    assert detect_family(ours, "visionfm") == "retfound_dinov2"


def test_urfound_layout_drops_decoder_and_report_branch(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "urfound_mm.pth"
    torch.save(_urfound_checkpoint(src), path)
    assert detect_family(read_checkpoint(path), "retfound_mae") == "urfound"
    model = create_model(_micro("UrFound"), num_classes=3)
    report = load_backbone_weights(model, str(path), "timm")
    assert report.family == "urfound"
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert "norm.weight" in report.dropped  # UrFound's fine-tuning pools like RETFound: a fresh fc_norm
    token = create_model(_micro("UrFound", global_pool="token"), num_classes=2)
    load_backbone_weights(token, str(path), "urfound")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(token, x), _features(src, x))


def test_retfiner_r_release_is_recognised_and_drops_proj(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "RetFiner_RETFound.pth"
    torch.save(_retfiner_encoder(src, proj=True, head=True), path)
    assert detect_family(read_checkpoint(path)) == "retfiner"  # the top-level 'proj' gives it away
    model = create_model(_micro("RetFiner_RETFound"), num_classes=3)
    report = load_backbone_weights(model, str(path), "timm")
    assert report.family == "retfiner"
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert {"norm.weight", "head.weight"} <= set(report.dropped)
    for k, v in src.state_dict().items():
        if not k.startswith("norm."):
            torch.testing.assert_close(model.state_dict()[k], v)
    token = create_model(_micro("RetFiner_RETFound", global_pool="token"), num_classes=2)
    load_backbone_weights(token, str(path), "retfiner")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(token, x), _features(src, x))


def test_retfiner_lightning_checkpoint_gives_only_the_vision_encoder(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "best-model.ckpt"
    torch.save(_retfiner_lightning(src), path)
    assert detect_family(read_checkpoint(path)) == "retfiner"
    model = create_model(_micro("RetFiner_RETFound", global_pool="token"), num_classes=2)
    report = load_backbone_weights(model, str(path), "timm")
    assert set(report.missing) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(model, x), _features(src, x))


def test_retfiner_v_and_u_files_are_plain_vits_read_by_the_zoo_label(tmp_path: Path):
    src = _source_vit("token")
    v_file = _retfiner_encoder(src, proj=False, head=False)
    assert detect_family(v_file) == "timm" and detect_family(v_file, "retfiner") == "retfiner"
    path = tmp_path / "RetFiner_VisionFM.pth"
    torch.save(v_file, path)
    model = create_model(_micro("RetFiner_VisionFM"), num_classes=3)
    report = load_backbone_weights(model, str(path), "retfiner")
    assert report.family == "retfiner" and set(report.missing) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(model, x), _features(src, x))
    path = tmp_path / "RetFiner_UrFound.pth"
    torch.save(_retfiner_encoder(src, proj=False, head=True), path)
    model = create_model(_micro("RetFiner_UrFound"), num_classes=3)
    report = load_backbone_weights(model, str(path), "retfiner")
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


ZOO_LAYOUTS = {  # new zoo entry -> the file its family's code writes, built from a micro source ViT
    "VisionFM_Fundus": _visionfm_checkpoint,
    "VisionFM_OCT": _visionfm_checkpoint,
    "UrFound": _urfound_checkpoint,
    "RetFiner_RETFound": lambda src: _retfiner_encoder(src, proj=True, head=True),
    "RetFiner_VisionFM": lambda src: _retfiner_encoder(src, proj=False, head=False),
    "RetFiner_UrFound": lambda src: _retfiner_encoder(src, proj=False, head=True),
}


@pytest.mark.parametrize("name", sorted(ZOO_LAYOUTS))
def test_new_zoo_entries_load_their_family_layout(name: str, tmp_path: Path):
    zoo = get_spec(name)
    src = _source_vit("token")
    path = tmp_path / f"{name}.pth"
    torch.save(ZOO_LAYOUTS[name](src), path)
    model = create_model(_micro(name), num_classes=3)
    report = load_backbone_weights(model, str(path), zoo.family)
    assert report.family == zoo.family
    fresh = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if zoo.global_pool == "avg" else set())
    assert set(report.missing) == fresh
    state = model.state_dict()
    for k, v in src.state_dict().items():
        if zoo.global_pool == "avg" and k.startswith("norm."):
            assert k not in state
        else:
            torch.testing.assert_close(state[k], v)


def test_weights_published_outside_the_hub_need_a_file(tmp_path: Path):
    spec = get_spec("RetFiner_RETFound")
    with pytest.raises(WeightsError, match="not on the Hugging Face Hub") as err:
        resolve_weights(spec, None)  # never a silent random initialisation
    assert spec.weights_url in str(err.value) and "--weights PATH" in str(err.value)
    with pytest.raises(WeightsError, match="VFM_OCT_weights|drive.google.com"):
        resolve_weights(get_spec("vit_base_patch16"), "VisionFM_OCT")
    f = tmp_path / "RetFiner_RETFound.pth"
    torch.save({}, f)
    assert resolve_weights(spec, str(f)) == str(f)
    assert resolve_weights(spec, "none") is None


def test_safetensors_and_ddp_prefixes(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "model.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    spec = ModelSpec(name="t", arch="vit_tiny_patch16_224", input_size=32, patch_size=8, arch_kwargs=MICRO)
    model = create_model(spec, num_classes=2)
    load_backbone_weights(model, str(path))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_features(model, x), _features(src, x))


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path):
    src = _source_vit("token")
    path = tmp_path / "mae.pth"
    torch.save(_mae_checkpoint(src), path)
    model = create_model(get_spec("vit_micro_patch8"), num_classes=2)  # embed 64, depth 4
    with pytest.raises(WeightsError, match="does not match architecture"):
        load_backbone_weights(model, str(path))


def test_file_without_matching_tensors_is_refused(tmp_path: Path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}}, path)
    model = create_model(get_spec("vit_micro_patch8"), num_classes=2)
    with pytest.raises(WeightsError, match="the backbone received no weights"):
        load_backbone_weights(model, str(path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/retinafm_pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_would_run_code_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(WeightsError, match="cannot be opened safely"):
        read_checkpoint(path)
    assert not Path("/tmp/retinafm_pwned").exists()


def test_resolve_weights_local_none_and_bad_values(tmp_path: Path):
    spec = get_spec("vit_micro_patch8")
    assert resolve_weights(spec, "none") is None
    assert resolve_weights(spec, None) is None  # no zoo weights for this entry
    f = tmp_path / "w.pth"
    torch.save({}, f)
    assert resolve_weights(spec, str(f)) == str(f)
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights(spec, str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="neither a file nor a Hugging Face repo"):
        resolve_weights(spec, "not a repo id")


def _fake_hub_cache(cache: Path, repo: str, filename: str, payload: dict) -> Path:
    """The standard HF cache layout, as `hf download` leaves it, for offline resolution."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    torch.save(payload, snap / filename)
    return snap / filename


def test_zoo_weights_come_from_the_offline_hub_cache(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    spec = get_spec("RETFound_mae_natureCFP")
    cached = _fake_hub_cache(tmp_path, "YukunZhou/RETFound_mae_natureCFP", "RETFound_mae_natureCFP.pth", {"model": {}})
    assert Path(resolve_weights(spec, None)).resolve() == cached.resolve()
    assert Path(resolve_weights(spec, "YukunZhou/RETFound_mae_natureCFP")).resolve() == cached.resolve()
    # A zoo weight by name, for another architecture entry.
    assert Path(resolve_weights(get_spec("vit_large_patch16"), "RETFound_mae_natureCFP")).resolve() == cached.resolve()
    with pytest.raises(WeightsError, match="no pretrained weights"):
        resolve_weights(spec, "vit_tiny_patch16")
    with pytest.raises(WeightsError, match="not in the Hugging Face cache"):
        resolve_weights(spec, "YukunZhou/RETFound_mae_meh:RETFound_mae_meh.pth")
    urfound = _fake_hub_cache(tmp_path, "yyyyk/UrFound", "urfound_mm.pth", {"model": {}})
    assert Path(resolve_weights(get_spec("UrFound"), None)).resolve() == urfound.resolve()
