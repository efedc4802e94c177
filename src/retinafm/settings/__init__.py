"""Typed settings for every verb (dataclasses), with YAML in and out.

The CLI fills these once (flags override a --config YAML file); library functions take them as
plain dataclasses, and every run saves its resolved settings as config.yaml.
"""
from retinafm.settings.base import (
    HEADS,
    MODALITIES,
    PRECISIONS,
    ConfigError,
    OctFrames,
    _at_least_one,
    _check_crop_scale,
    _check_warmup,
    check_device,
    check_precision,
    check_preprocessing,
    config_fields,
    flag_name,
    parse_oct_frames,
    read_yaml_settings,
    setting,
    to_dict,
)
from retinafm.settings.training import (
    PRETRAIN_DEFAULTS,
    FinetuneSettings,
    PretrainSettings,
    RefineSettings,
)

__all__ = ['HEADS', 'MODALITIES', 'OctFrames', 'ConfigError', 'parse_oct_frames', 'check_preprocessing', '_at_least_one', '_check_warmup', '_check_crop_scale', 'check_device', 'PRECISIONS', 'check_precision', 'setting', 'flag_name', 'config_fields', 'read_yaml_settings', 'to_dict', 'FinetuneSettings', 'PRETRAIN_DEFAULTS', 'PretrainSettings', 'RefineSettings']
