"""Typed settings for every verb (dataclasses), with YAML in and out.

Each field carries its default and help text (`setting()`); the CLI generates its options from them
and fills these once (flags override a --config YAML file); library functions take them as plain
dataclasses, and every run saves its resolved settings as config.yaml.
"""
from retinafm.settings.base import (
    HEADS,
    MODALITIES,
    OCT_FRAMES_HELP,
    PRECISION_HELP,
    PRECISIONS,
    ConfigError,
    Head,
    Modality,
    OctFrames,
    Precision,
    Settings,
    _at_least_one,
    _check_crop_scale,
    _check_warmup,
    available_cpus,
    check_bounds,
    check_device,
    check_precision,
    check_preprocessing,
    check_ratios,
    check_types,
    check_value,
    comma_list,
    config_fields,
    field_types,
    fit_warmup,
    fit_workers,
    flag_name,
    flag_text,
    list_item_type,
    option_flag,
    parse_oct_frames,
    read_yaml_settings,
    setting,
    to_dict,
    unwrap_optional,
)
from retinafm.settings.commands import CompareSettings, ImportSettings, ProbeSettings, SplitSettings
from retinafm.settings.inference import (
    EmbedSettings,
    EvaluateSettings,
    ExplainSettings,
    ExportSettings,
    HeatmapMethod,
    PredictSettings,
    check_onnx_options,
    is_onnx,
)
from retinafm.settings.training import (
    PRETRAIN_DEFAULTS,
    VISION_LANGUAGE_LOSSES,
    FinetuneSettings,
    PretrainSettings,
    RefineSettings,
)

__all__ = [
    "HEADS", "MODALITIES", "PRECISIONS", "Head", "Modality", "Precision", "OctFrames",
    "OCT_FRAMES_HELP", "PRECISION_HELP", "ConfigError", "Settings", "parse_oct_frames", "check_preprocessing",
    "_at_least_one", "_check_warmup", "_check_crop_scale", "check_device", "check_precision", "setting", "flag_name",
    "flag_text", "config_fields", "field_types", "unwrap_optional", "list_item_type", "comma_list", "fit_warmup",
    "read_yaml_settings", "to_dict", "available_cpus", "check_bounds", "check_ratios", "check_types", "check_value",
    "fit_workers", "option_flag", "FinetuneSettings", "PRETRAIN_DEFAULTS", "VISION_LANGUAGE_LOSSES",
    "PretrainSettings", "RefineSettings", "SplitSettings", "CompareSettings", "ImportSettings",
    "PredictSettings", "ProbeSettings", "EvaluateSettings",
    "ExplainSettings", "HeatmapMethod", "ExportSettings", "EmbedSettings", "is_onnx", "check_onnx_options",
]
