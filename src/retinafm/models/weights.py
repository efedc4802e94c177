"""Pretrained weights: find the file (Hub or local), open it safely, adapt its keys, load loudly.

Each checkpoint family has one adapter that turns its file into timm-style keys; timm's own
`checkpoint_filter_fn` of the target architecture then does the architecture conversions it
already knows (DINOv2 registers/SwiGLU, DINOv3 storage tokens and layer scale, position
embedding and patch embedding resampling).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from retinafm.files.inputs import (
    CHECKPOINT_MAX_BYTES,
    InputFileError,
    check_safetensors_header,
    check_torch_zip,
    open_regular,
)
from retinafm.models.heads import HEAD_PREFIXES
from retinafm.models.registry import ZOO, ModelSpec

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class WeightsError(RuntimeError):
    """Weights that cannot be found, opened or loaded; the message says what to do."""


@dataclass
class LoadReport:
    source: str
    family: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source} ({self.family} layout)"]
        if self.missing:
            lines.append(f"  newly initialised (not in the checkpoint): {', '.join(self.missing)}")
        if self.dropped:
            shown = ", ".join(self.dropped[:8]) + (f" … (+{len(self.dropped) - 8})" if len(self.dropped) > 8 else "")
            lines.append(f"  not used by this model: {shown}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- finding the file
def resolve_weights(spec: ModelSpec, weights: str | None) -> str | None:
    """Turn --weights into a local file path, downloading from the Hub when needed.

    None means the zoo entry's own weights; 'none' means random initialisation. A value that is
    an existing file is used as is; a zoo name means that entry's weights; `hf-hub:org/repo[:file]`
    or `org/repo[:file]` is downloaded.
    """
    if weights is not None and weights.lower() == "none":
        return None
    if weights is None:
        if not spec.hf_repo:
            if spec.weights_url:
                raise WeightsError(_download_hint(spec, f"--model {spec.name}"))
            return None
        return hub_download(spec.hf_repo, spec.hf_filename)
    path = Path(weights).expanduser()
    if path.is_file() or (path.exists() and not path.is_dir()):
        return str(path)  # a FIFO or device too: read_checkpoint refuses it, saying what it is
    if weights in ZOO:  # another zoo entry's weights, e.g. --model vit_large_patch16 --weights RETFound_mae_meh
        other = ZOO[weights]
        if not other.hf_repo:
            if other.weights_url:
                raise WeightsError(_download_hint(other, f"--weights {weights}"))
            raise WeightsError(f"--weights {weights}: that zoo entry has no pretrained weights")
        return hub_download(other.hf_repo, other.hf_filename)
    repo, _, filename = weights.removeprefix("hf-hub:").partition(":")
    explicit_hub = weights.startswith("hf-hub:") or bool(filename)
    if not explicit_hub and (path.suffix in WEIGHT_SUFFIXES or weights.startswith((".", "/", "~"))):
        raise WeightsError(f"--weights {weights}: no such file")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise WeightsError(
            f"--weights {weights!r} is neither a file nor a Hugging Face repo id (org/name[:file]); "
            "use 'none' for random initialisation."
        )
    if not filename and spec.hf_repo == repo:
        filename = spec.hf_filename or ""
    return hub_download(repo, filename or None)


def _download_hint(spec: ModelSpec, what: str) -> str:
    return (f"{what}: the weights of {spec.name} are not on the Hugging Face Hub. Download {spec.weights_url} "
            "and pass the file with --weights PATH (or --weights none for random initialisation).")


def hub_download(repo_id: str, filename: str | None) -> str:
    """Download (or take from the HF cache) one weights file; honours HF_TOKEN and HF_HUB_OFFLINE."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    candidates = [filename] if filename else ["model.safetensors", "pytorch_model.bin", f"{repo_id.split('/')[-1]}.pth"]
    for i, name in enumerate(candidates):
        try:
            return hf_hub_download(repo_id=repo_id, filename=name)
        except GatedRepoError:
            raise WeightsError(
                f"{repo_id} is a gated repository: request access on its Hugging Face page, then log in "
                "(`hf auth login`) or set HF_TOKEN, and run again."
            ) from None
        except RepositoryNotFoundError:
            raise WeightsError(
                f"Hugging Face repo {repo_id} was not found, or your token cannot see it. Check the name, "
                "log in (`hf auth login` or HF_TOKEN), or pass a local file with --weights PATH."
            ) from None
        # LocalEntryNotFoundError subclasses EntryNotFoundError in huggingface_hub, so it comes first.
        except LocalEntryNotFoundError:
            if i + 1 < len(candidates) and not filename:
                continue
            raise WeightsError(
                f"{repo_id}/{name} is not in the Hugging Face cache and the Hub cannot be reached "
                "(offline, or HF_HUB_OFFLINE=1). Download it on a connected machine "
                f"(`hf download {repo_id} {name}`) and copy the cache, or pass --weights /path/to/file."
            ) from None
        except EntryNotFoundError:
            if i + 1 < len(candidates):
                continue
            raise WeightsError(f"{repo_id} has no file {name!r}; name it as --weights {repo_id}:FILE") from None
    raise WeightsError(f"no weights file found in {repo_id}")  # pragma: no cover - loop always returns/raises


# --------------------------------------------------------------------------- opening the file
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Open a .pth/.pt/.bin or .safetensors file without running any code it may contain.

    MAE-style training code stores its argparse.Namespace under 'args'; that one class is
    allowed, everything else is refused by torch's weights-only unpickler.
    """
    path = Path(path)
    try:
        # A regular file within the size limit; a zip checkpoint whose members would inflate far
        # beyond the file is refused from its central directory, before anything decompresses.
        with open_regular(path, what="--weights", max_bytes=CHECKPOINT_MAX_BYTES, kind="weights files",
                          hint="give the path of a weights file (.pth, .safetensors)") as fh:
            if path.suffix == ".safetensors":
                check_safetensors_header(fh, what="--weights", path=path)
            else:
                check_torch_zip(fh, what="--weights", path=path)
                with torch.serialization.safe_globals([argparse.Namespace]):
                    obj = torch.load(fh, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except InputFileError as exc:
        raise WeightsError(str(exc)) from None
    except OSError as exc:
        raise WeightsError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # weights-only unpickling errors are plain exceptions
        raise WeightsError(
            f"{path} cannot be opened safely: it is not a weights file, or it holds Python objects that "
            f"would run code when loaded ({str(exc).splitlines()[0][:200]}). Re-save only the state dict "
            "(torch.save(model.state_dict(), ...)) or use .safetensors."
        ) from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:  # the file was checked above; safetensors maps it itself
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path} is not a valid safetensors file: {exc}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def non_finite_tensors(weights: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors holding NaN or ±inf.

    A sum screens each tensor (NaN and inf survive it; ~0.1 s for a ViT-L's 300M weights on one
    thread, where isfinite().all() takes ~1 s); only a non-finite sum, which may also be an fp16
    overflow of finite values, is confirmed element by element."""
    return [name for name, tensor in weights.items()
            if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex())
            and not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all())]


def non_finite_message(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(names[:shown]) + (f" … (+{len(names) - shown} more)" if len(names) > shown else "")
    return f"{len(names)} weight tensor(s) hold NaN or infinite values ({listed})"


# --------------------------------------------------------------------------- family adapters
def _tensors(d: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}


def _strip(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _unchunk_blocks(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DINOv2 training with block_chunks stores blocks.<chunk>.<global index>.*
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


def _swiglu_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2."): v for k, v in sd.items()}


def _drop(sd: dict[str, torch.Tensor], pattern: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not re.match(pattern, k)}


def adapt_retfound_mae(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """RETFound-MAE / MAE pretraining: weights under 'model'; the decoder is pretraining-only."""
    sd = _strip(_tensors(ckpt.get("model", ckpt)), ("module.",))
    return _drop(sd, r"^(decoder_|mask_token$)")


def adapt_retfound_dinov2(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """RETFound-DINOv2 (DINOv2 training code): the EMA teacher's 'backbone.' under 'teacher'; in a
    `retinafm pretrain --method dino` checkpoint the same names sit under 'model' as 'teacher.'."""
    if not isinstance(ckpt.get("teacher"), dict) and _has_prefix(ckpt.get("model"), DINO_TEACHER):
        ckpt = {"teacher": {k[len("teacher."):]: v for k, v in ckpt["model"].items() if k.startswith("teacher.")}}
    sd = _tensors(ckpt.get("teacher", ckpt))
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return _swiglu_names(_unchunk_blocks(_strip(sd, ("module.",))))


def adapt_dinov2(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 hub files (flat, 'mask_token', maybe chunked blocks) or timm's copies."""
    sd = _tensors(ckpt.get("state_dict", ckpt))
    return _swiglu_names(_unchunk_blocks(_strip(sd, ("module.", "backbone."))))


def adapt_dinov3(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Meta's DINOv3 files (storage tokens, ls*.gamma) or timm's; timm's Eva filter renames them."""
    sd = _tensors(ckpt.get("teacher", ckpt.get("model", ckpt)))
    return _strip(sd, ("module.", "backbone."))


def adapt_visionfm(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """VisionFM (iBOT training code): the EMA teacher's 'backbone.' under 'teacher', beside its iBOT
    'head.'; else the DDP student ('module.backbone.') or a bare backbone. 'masked_embed' is the
    student's masked-image-modelling token, pretraining-only."""
    sd: Any = ckpt
    for key in ("teacher", "student", "state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    sd = _strip(_tensors(sd), ("module.",))
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return _drop(sd, r"^masked_embed$")


def adapt_urfound(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """UrFound (MAE code plus a BERT report branch): weights under 'model'; the image decoder, mask token
    and the report branch ('bert_encoder.', 'bert_mlp.') are pretraining-only."""
    sd = _strip(_tensors(ckpt.get("model", ckpt)), ("module.",))
    return _drop(sd, r"^(decoder_|mask_token$|bert_encoder\.|bert_mlp\.)")


RETFINER_PREFIX = "model.vision_encoder."  # the Lightning module's `model` (RetFiner's RFM) and its vision encoder


def adapt_retfiner(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """RetFiner: the vision encoder taken out of the refinement model (flat timm-style keys; released
    files and get_vision_backbone_for_linprobing.py's output), or the Lightning checkpoint itself
    ('state_dict' with 'model.vision_encoder.' beside the text model and the contrastive/matching heads).
    'proj' (RetFiner-R: ViT-L width to the text model's 768) and the classification head do not carry over."""
    sd: Any = ckpt
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    sd = _tensors(sd)
    if any(k.startswith(RETFINER_PREFIX) for k in sd):
        # get_vision_backbone_for_linprobing.py also knows an encoder wrapped once more ('...vision_encoder.model.').
        sd = {re.sub(r"^model\.", "", k[len(RETFINER_PREFIX):]): v
              for k, v in sd.items() if k.startswith(RETFINER_PREFIX)}
    sd = _strip(sd, ("module.", "_orig_mod."))
    return _drop(sd, r"^(proj\.|masked_embed$)")


def adapt_retinafm_refine(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A `retinafm refine` checkpoint: the vision tower ('vision.') of the refinement model."""
    return {k[len("vision."):]: v for k, v in _tensors(ckpt["model"]).items() if k.startswith("vision.")}


def adapt_timm(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Plain timm state dicts, 'state_dict'/'model' wrappers, DDP 'module.' and torch.compile prefixes."""
    for key in ("model", "state_dict", "model_ema"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    return _strip(_tensors(ckpt), ("module.", "_orig_mod."))


ADAPTERS: dict[str, Callable[[dict[str, Any]], dict[str, torch.Tensor]]] = {
    "retfound_mae": adapt_retfound_mae,
    "retfound_dinov2": adapt_retfound_dinov2,
    "dinov2": adapt_dinov2,
    "dinov3": adapt_dinov3,
    "visionfm": adapt_visionfm,
    "urfound": adapt_urfound,
    "retfiner": adapt_retfiner,
    "timm": adapt_timm,
    "retinafm": adapt_timm,
    "retinafm_refine": adapt_retinafm_refine,
}

DINO_TEACHER = "teacher.backbone."  # `retinafm pretrain --method dino`: the teacher network under 'model'


def _has_prefix(sd: Any, prefix: str) -> bool:
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith(prefix) for k in sd)


def _retinafm_kind(ckpt: dict[str, Any]) -> str | None:
    """The kind of a checkpoint retinafm wrote (classifier, probe, pretrain, refine), else None.
    Files from before the one checkpoint layout kept pretraining / refinement metadata apart."""
    if "retinafm_pretrain" in ckpt:
        return "pretrain"
    if "retinafm_refine" in ckpt:
        return "refine"
    info = ckpt.get("retinafm")
    if not isinstance(info, dict):
        return None
    return info.get("kind") or ("probe" if info.get("backbone") else "classifier")


def detect_family(ckpt: dict[str, Any], default: str = "timm") -> str:
    """Recognise a checkpoint's family from its contents (the file wins over the zoo's label)."""
    kind = _retinafm_kind(ckpt)
    if kind in ("classifier", "probe"):
        return "retinafm"
    if kind == "refine":
        return "retinafm_refine"
    # A retinafm pretraining file is read by its keys, like the families it follows (MAE, DINO).
    if _has_prefix(ckpt.get("model"), DINO_TEACHER):
        return "retfound_dinov2"
    if isinstance(ckpt.get("teacher"), dict):
        return "visionfm" if _is_ibot(ckpt, default) else "retfound_dinov2"
    inner = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else ckpt
    keys = [k for k in inner if isinstance(k, str)]
    if any(k.startswith(("bert_encoder.", "bert_mlp.", "module.bert_encoder.", "module.bert_mlp.")) for k in keys):
        return "urfound"
    if any(k.startswith(("decoder_", "module.decoder_")) for k in keys):
        return "retfound_mae"
    if _is_retfiner(ckpt):
        return "retfiner"
    if any("storage_tokens" in k for k in keys):
        return "dinov3"
    if any(k.endswith("mask_token") for k in keys) or \
            any(re.match(r"(backbone\.)?blocks\.\d+\.\d+\.", k) for k in keys):
        return "dinov2"
    return default


def _is_ibot(ckpt: dict[str, Any], default: str) -> bool:
    """A 'teacher' from iBOT's training code (VisionFM), not DINOv2's nor `retinafm pretrain --method dino`'s:
    iBOT saves its loss state as 'ibot_loss' and its head always holds 'last_layer2' (the patch-token
    projection, a second name for 'last_layer' when shared). Without either, a VisionFM label decides."""
    if _retinafm_kind(ckpt) == "pretrain":
        return False
    teacher = [k for k in ckpt["teacher"] if isinstance(k, str)]
    if "ibot_loss" in ckpt or any(k.startswith(("head.last_layer2.", "module.head.last_layer2.")) for k in teacher):
        return True
    return default == "visionfm" and not any("dino_head." in k or "ibot_head." in k for k in teacher)


def _is_retfiner(ckpt: dict[str, Any]) -> bool:
    """RetFiner's Lightning checkpoint ('state_dict' with 'model.vision_encoder.'), or RetFiner-R's extracted
    encoder: a ViT with a top-level 'proj' to the text width, which no other family has. RetFiner-V and -U
    files are plain ViT keys, recognised only by the zoo label."""
    inner = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), dict) else ckpt
    keys = [k for k in inner if isinstance(k, str)]
    if any(k.startswith(RETFINER_PREFIX + "blocks.") or k.startswith(RETFINER_PREFIX + "model.blocks.") for k in keys):
        return True
    return any(re.fullmatch(r"(module\.)?proj\.weight", k) for k in keys) and any(
        re.match(r"(module\.)?blocks\.\d+\.", k) for k in keys)


# --------------------------------------------------------------------------- loading
def _timm_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    module = sys.modules[type(model).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    return filter_fn(sd, model) if filter_fn is not None else sd


def load_backbone_weights(model: nn.Module, path: str, family_hint: str = "timm") -> LoadReport:
    """Load a pretrained backbone into `model`; the task head is left as it is (see heads.init_head).

    Fails when the checkpoint does not fit the architecture (anything beyond the head and the
    global-pool norm missing, or weights of other shapes) or gives the backbone nothing.
    """
    ckpt = read_checkpoint(path)
    family = detect_family(ckpt, default=family_hint)
    sd = ADAPTERS[family](ckpt)
    if not sd:
        raise WeightsError(f"{path} holds no tensors in a layout retinafm knows ({family})")
    bad = non_finite_tensors(sd)
    if bad:
        raise WeightsError(f"{path}: {non_finite_message(bad)}; these weights would make every output NaN. "
                           "Use weights from a run that did not diverge.")
    expected = model.state_dict()
    dropped = sorted(k for k in sd if k.startswith(HEAD_PREFIXES))  # pretraining heads never carry over
    sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
    if isinstance(getattr(model, "norm", None), nn.Identity):
        # The global-pool recipe replaces the final norm with a fresh fc_norm (RETFound).
        dropped += sorted(k for k in sd if k.startswith("norm."))
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    try:
        sd = _timm_filter(sd, model)
    except Exception as exc:
        raise WeightsError(f"{path} does not fit {type(model).__name__}: {exc}") from None
    dropped += sorted(k for k in sd if k == "mask_token")
    sd = {k: v for k, v in sd.items() if k != "mask_token"}
    if not set(sd) & set(expected):
        raise WeightsError(
            f"{path}: the backbone received no weights (none of its {len(sd)} tensors, e.g. "
            f"{_short(sorted(sd), 3)}, fit this model). Pick the --model this checkpoint was trained with."
        )
    unexpected = sorted(set(sd) - set(expected))
    wrong_shape = sorted(k for k in sd if k in expected and sd[k].shape != expected[k].shape)
    fresh_ok = tuple(HEAD_PREFIXES) + ("fc_norm.",)
    missing = sorted(set(expected) - set(sd))
    bad_missing = [k for k in missing if not k.startswith(fresh_ok)]
    if unexpected or wrong_shape or bad_missing:
        details = []
        if bad_missing:
            details.append(f"missing from the file: {_short(bad_missing)}")
        if unexpected:
            details.append(f"not in the model: {_short(unexpected)}")
        if wrong_shape:
            details.append("shape mismatch: " + _short([f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                                                        for k in wrong_shape]))
        raise WeightsError(
            f"{path} ({family} layout) does not match architecture {_architecture(model)}: "
            + "; ".join(details) + ". Pick the --model this checkpoint was trained with."
        )
    model.load_state_dict(sd, strict=False)  # the key sets were checked above: only head/fc_norm may be new
    return LoadReport(str(path), family, len(sd), missing=missing, dropped=dropped)


def _architecture(model: nn.Module) -> str:
    return getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" … (+{len(keys) - n} more)" if len(keys) > n else "")
