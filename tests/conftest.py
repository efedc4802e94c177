"""Shared fixtures. Tests never touch the network: the Hub is forced offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # two xdist workers share two cores

from pathlib import Path

import pytest
import torch
from helpers import (
    oct_bscans,
    tiny_finetune_config,
    write_dicom,
    write_heidelberg_vol,
    write_multipage_tiff,
)

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _fp32_on_every_cpu():
    """The suite compares CPU outputs with fp32 references; on a CPU with AMX or AVX-512-BF16,
    --precision auto would choose bf16. That choice is tested on its own in test_runtime.py."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("retinafm.runtime.device.cpu_has_native_bf16", lambda: False)
        yield


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small synthetic fundus data set in the folder layout (3 classes, 64 px)."""
    from retinafm.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    return write_demo_dataset(root, n_train=24, n_val=8, n_test=8, size=64, seed=0)


@pytest.fixture(scope="session")
def trained_run(demo_data, tmp_path_factory) -> Path:
    """A finished 2-epoch run directory (read-only for the tests that use it)."""
    from retinafm.workflows.finetune import finetune

    run = tmp_path_factory.mktemp("trained") / "run"
    finetune(tiny_finetune_config(demo_data, run, epochs=2, bootstrap=200))
    return run


@pytest.fixture(scope="session")
def multilabel_manifest(tmp_path_factory) -> Path:
    """Synthetic fundus images with three independent findings, 5 % of label cells unknown."""
    from retinafm.data.synthetic import write_multilabel_dataset

    root = tmp_path_factory.mktemp("multilabel") / "data"
    return write_multilabel_dataset(root, n_train=120, n_val=40, n_test=40, size=64, seed=0)


@pytest.fixture(scope="session")
def regression_manifest(tmp_path_factory) -> Path:
    """Synthetic fundus images with a cup-to-disc ratio and a haemorrhage count to regress."""
    from retinafm.data.synthetic import write_regression_dataset

    root = tmp_path_factory.mktemp("regression") / "data"
    return write_regression_dataset(root, n_train=120, n_val=40, n_test=40, size=64, seed=0)


@pytest.fixture(scope="session")
def oct_volume_data(tmp_path_factory) -> Path:
    """A labelled folder of OCT volumes: 5-frame DICOMs (amd: a bright band; normal: faint), and in
    test/ also a Heidelberg .vol and a multi-page TIFF."""
    root = tmp_path_factory.mktemp("oct") / "data"
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for label, bright in (("amd", 1.0), ("normal", 0.2)):
            for i in range(count):
                write_dicom(root / split / label / f"{label}_{split}{i}.dcm", oct_bscans(5, seed=100 * i + len(split),
                                                                                          bright=bright))
    write_heidelberg_vol(root / "test" / "amd" / "heyex.vol", oct_bscans(4, seed=7, bright=1.0))
    write_multipage_tiff(root / "test" / "normal" / "stack.tif", oct_bscans(3, seed=8, bright=0.2))
    return root


@pytest.fixture(scope="session")
def oct_run(oct_volume_data, tmp_path_factory) -> Path:
    """A short run on every B-scan of the OCT volumes (read-only for the tests that use it)."""
    from retinafm.workflows.finetune import finetune

    run = tmp_path_factory.mktemp("oct_run") / "run"
    finetune(tiny_finetune_config(oct_volume_data, run, epochs=3, oct_frames="all", batch_size=8))
    return run


REPORT_WORDS = ("normal fundus no disease visible optic disc cup large pale glaucoma suspected haemorrhages "
                "exudates microaneurysms diabetic retinopathy present moderate severe mild with and the of a "
                "right left eye macula vessels").split()


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a word-level vocabulary, saved like a hub folder (random weights)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(REPORT_WORDS)), ".", ","]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder
