"""retinafm embed: one pooled vector per image, identical across runs, resumable, carried columns."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import retinafm.workflows.embed as embed_module
from retinafm.data.embeddings import read_embeddings
from retinafm.data.images import image_table
from retinafm.data.sources import DataSourceError
from retinafm.data.transforms import eval_transform
from retinafm.engine.features import embedding_model
from retinafm.files import OutputExistsError
from retinafm.settings import ConfigError, EmbedSettings
from retinafm.workflows.embed import embed


def tiny(**overrides) -> EmbedSettings:
    settings = dict(model="vit_micro_patch8", weights="none", input_size=32, batch_size=8, num_workers=0,
                    device="cpu", dtype="float32")
    settings.update(overrides)
    return EmbedSettings(**settings)


def test_folder_gives_path_split_label_and_identical_vectors_across_runs(demo_data, tmp_path):
    first = embed(demo_data, tmp_path / "a.parquet", tiny(), progress=False)
    second = embed(demo_data, tmp_path / "b.parquet", tiny(), progress=False)
    a, b = read_embeddings(first.out), read_embeddings(second.out)
    assert list(a.frame.columns) == ["path", "split", "label"]
    assert len(a.frame) == 3 * (24 + 8 + 8) and a.vectors.shape == (120, 64)  # vit_micro: width 64
    assert sorted(a.frame["split"].unique()) == ["test", "train", "val"]
    assert set(a.frame["label"]) == {"diabetic_retinopathy", "glaucoma", "normal"}
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.info["model"] == "vit_micro_patch8" and a.info["pool"] == "avg" and a.info["dim"] == 64
    assert a.info["input_size"] == 32 and a.info["weights"] == "none" and a.info["precision"] == "fp32"


def test_vectors_are_the_models_pooled_features(demo_data, tmp_path):
    """What the head of the model sees: forward_head(forward_features(x), pre_logits=True)."""
    result = embed(demo_data / "val", tmp_path / "e.parquet", tiny(), progress=False)
    emb = read_embeddings(result.out)
    model, info = embedding_model(tiny())
    transform = eval_transform(info["input_size"], info["mean"], info["std"], info["crop_pct"])
    from retinafm.data.loader import ImageDataset

    dataset = ImageDataset(emb.frame["path"].tolist()[:5], [None] * 5, transform)
    batch = torch.stack([dataset[i][0] for i in range(5)])
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(batch), pre_logits=True).numpy()
    np.testing.assert_allclose(emb.vectors[:5], expected, rtol=1e-5, atol=1e-6)


def test_a_finetuned_checkpoint_embeds_with_its_own_recipe(trained_run, demo_data, tmp_path):
    from retinafm.engine.checkpoint import load_checkpoint
    from retinafm.engine.inference import model_from_checkpoint

    settings = EmbedSettings(checkpoint=str(trained_run / "checkpoint-best.pth"), num_workers=0, device="cpu",
                             dtype="float32")
    result = embed(demo_data / "test", tmp_path / "c.npy", settings, progress=False)
    emb = read_embeddings(result.out)
    assert (tmp_path / "c.csv").is_file() and (tmp_path / "c.json").is_file()
    assert emb.info["class_names"] == ["diabetic_retinopathy", "glaucoma", "normal"]
    model, meta = model_from_checkpoint(load_checkpoint(trained_run / "checkpoint-best.pth"))
    # The checkpoint's head applied to its embeddings gives the model's logits.
    from retinafm.data.loader import ImageDataset

    transform = eval_transform(meta.input_size, meta.mean, meta.std, meta.eval_crop_pct)
    dataset = ImageDataset(emb.frame["path"].tolist()[:4], [None] * 4, transform)
    with torch.no_grad():
        logits = model.eval()(torch.stack([dataset[i][0] for i in range(4)]))
        from_embeddings = model.head(torch.from_numpy(emb.vectors[:4]))
    torch.testing.assert_close(from_embeddings, logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataSourceError, match="trained with the average pool"):
        embed(demo_data / "test", tmp_path / "d.npy",
              EmbedSettings(checkpoint=str(trained_run / "checkpoint-best.pth"), pool="cls"), progress=False)


def test_float16_default_pool_and_flip(demo_data, tmp_path):
    half = read_embeddings(embed(demo_data / "val", tmp_path / "h.parquet", tiny(dtype="float16"), progress=False).out)
    full = read_embeddings(embed(demo_data / "val", tmp_path / "f.parquet", tiny(), progress=False).out)
    np.testing.assert_allclose(half.vectors, full.vectors, rtol=2e-3, atol=2e-3)
    import pyarrow.parquet as pq

    assert str(pq.read_schema(tmp_path / "h.parquet").field("embedding").type.value_type) == "halffloat"
    cls = read_embeddings(embed(demo_data / "val", tmp_path / "cls.parquet", tiny(pool="cls"), progress=False).out)
    assert cls.info["pool"] == "cls" and not np.allclose(cls.vectors, full.vectors)
    flip = read_embeddings(embed(demo_data / "val", tmp_path / "flip.parquet", tiny(tta_flip=True), progress=False).out)
    model, info = embedding_model(tiny())
    from retinafm.data.loader import ImageDataset

    transform = eval_transform(info["input_size"], info["mean"], info["std"], info["crop_pct"])
    x = ImageDataset(flip.frame["path"].tolist()[:2], [None] * 2, transform)
    x = torch.stack([x[i][0] for i in range(2)])
    with torch.no_grad():
        pooled = lambda t: model.forward_head(model.forward_features(t), pre_logits=True)  # noqa: E731
        expected = ((pooled(x) + pooled(torch.flip(x, dims=[-1]))) / 2).numpy()
    np.testing.assert_allclose(flip.vectors[:2], expected, rtol=1e-5, atol=1e-6)
    assert flip.info["tta_flip"] is True


def test_manifest_columns_travel_and_relative_paths_resolve(demo_data, tmp_path):
    images = sorted((demo_data / "val").rglob("*.png"))[:6]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(p.relative_to(demo_data)) for p in images], "split": "test",
                  "patient_id": [f"p{i // 2}" for i in range(6)], "cdr": np.linspace(0.2, 0.7, 6)}
                 ).to_csv(manifest, index=False)
    (tmp_path / "val").symlink_to(demo_data / "val")  # paths are relative to the manifest
    emb = read_embeddings(embed(manifest, tmp_path / "m.parquet", tiny(), progress=False).out)
    assert list(emb.frame.columns) == ["path", "split", "patient_id", "cdr"]
    assert emb.frame["patient_id"].tolist() == ["p0", "p0", "p1", "p1", "p2", "p2"]
    np.testing.assert_allclose(emb.frame["cdr"], np.linspace(0.2, 0.7, 6))


def test_plain_folder_and_unreadable_files_are_skipped_by_name(demo_data, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for p in sorted((demo_data / "test" / "glaucoma").glob("*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    result = embed(folder, tmp_path / "n.parquet", tiny(), progress=False)
    emb = read_embeddings(result.out)
    assert list(emb.frame.columns) == ["path"] and len(emb.frame) == 3
    assert [name for name, _ in result.skipped] == [str(folder / "broken.png")]
    skipped = pd.read_csv(tmp_path / "n_skipped.csv")
    assert skipped["path"].tolist() == [str(folder / "broken.png")]


def test_interrupted_run_resumes_without_recomputing_finished_shards(demo_data, tmp_path, monkeypatch):
    out = tmp_path / "r.parquet"
    settings = tiny(shard_size=20)  # 120 images: 6 shards
    calls = {"n": 0}
    real_infer = embed_module.infer

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(embed_module, "infer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed(demo_data, out, settings, progress=False)
    assert not out.exists() and len(list((tmp_path / "r.parquet.parts").glob("shard-*.npz"))) == 2

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(embed_module, "infer", counting)
    result = embed(demo_data, out, settings, progress=False)
    assert result.shards_reused == 2 and counted["n"] == 4
    assert not (tmp_path / "r.parquet.parts").exists()
    fresh = read_embeddings(embed(demo_data, tmp_path / "fresh.parquet", settings, progress=False).out)
    resumed = read_embeddings(out)
    np.testing.assert_array_equal(resumed.vectors, fresh.vectors)
    assert resumed.frame["path"].tolist() == fresh.frame["path"].tolist()


def test_unfinished_run_with_other_settings_is_not_mixed_in(demo_data, tmp_path, monkeypatch):
    out = tmp_path / "x.parquet"
    real_infer, calls = embed_module.infer, []

    def stop_after_one_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(embed_module, "infer", stop_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        embed(demo_data, out, tiny(shard_size=50), progress=False)
    monkeypatch.undo()
    with pytest.raises(OutputExistsError, match=r"pool differ.*--overwrite"):
        embed(demo_data, out, tiny(pool="cls", shard_size=50), progress=False)
    assert embed(demo_data, out, tiny(pool="cls", shard_size=50), overwrite=True, progress=False).count == 120


def test_a_run_stopped_before_its_first_shard_leaves_nothing_to_resume(demo_data, tmp_path, monkeypatch):
    out = tmp_path / "x.parquet"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "infer", stop)
    with pytest.raises(KeyboardInterrupt):
        embed(demo_data, out, tiny(), progress=False)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # so other settings are not refused as "mixed in"
    assert embed(demo_data, out, tiny(pool="cls"), progress=False).count == 120


def test_existing_output_is_refused(demo_data, tmp_path):
    out = tmp_path / "e.parquet"
    embed(demo_data / "val", out, tiny(), progress=False)
    with pytest.raises(OutputExistsError, match="e.parquet"):
        embed(demo_data / "val", out, tiny(), progress=False)


@pytest.mark.parametrize("settings,images,out,error,message", [
    (dict(model=None), "{data}", "e.parquet", ConfigError, "exactly one of --model"),
    (dict(checkpoint="c.pth"), "{data}", "e.parquet", ConfigError, "exactly one of --model"),
    (dict(pool="mean"), "{data}", "e.parquet", ConfigError, "--pool must be one of cls, avg"),
    (dict(dtype="int8"), "{data}", "e.parquet", ConfigError, "--dtype must be one of"),
    (dict(input_size=36), "{data}", "e.parquet", DataSourceError, "multiple of vit_micro_patch8's patch size 8"),
    ({}, "{data}", "e.h5", DataSourceError, "write .parquet"),
    ({}, "{tmp}/nowhere", "e.parquet", DataSourceError, "no such file or folder"),
    ({}, "{tmp}/empty", "e.parquet", DataSourceError, "contains no image files"),
    ({}, "{tmp}/nopath.csv", "e.parquet", DataSourceError, "needs a 'path' column"),
])
def test_bad_input_is_named(settings, images, out, error, message, demo_data, tmp_path):
    (tmp_path / "empty").mkdir()
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "nopath.csv", index=False)
    with pytest.raises(error, match=message):
        embed(images.format(data=demo_data, tmp=tmp_path), tmp_path / out, tiny(**settings), progress=False)


def test_read_embeddings_errors(tmp_path):
    with pytest.raises(DataSourceError, match="no such file"):
        read_embeddings(tmp_path / "none.parquet")
    np.save(tmp_path / "v.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DataSourceError, match="v.csv is missing"):
        read_embeddings(tmp_path / "v.npy")
    pd.DataFrame({"path": ["a"]}).to_csv(tmp_path / "v.csv", index=False)
    with pytest.raises(DataSourceError, match="2 vectors for 1 index rows"):
        read_embeddings(tmp_path / "v.npy")
    pd.DataFrame({"path": ["a"]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataSourceError, match="no 'embedding' column"):
        read_embeddings(tmp_path / "p.parquet")
    (tmp_path / "bad.parquet").write_text("nope")
    with pytest.raises(DataSourceError, match="not a readable parquet"):
        read_embeddings(tmp_path / "bad.parquet")


def test_image_table_from_a_dataframe():
    with pytest.raises(DataSourceError, match="'path' column"):
        image_table(pd.DataFrame({"file": ["a"]}))
    table = image_table(pd.DataFrame({"path": ["a", "b"], "split": ["train", "val"]}, index=[5, 7]))
    assert table.index.tolist() == [0, 1]


def test_npy_and_parquet_hold_the_same(demo_data, tmp_path):
    a = read_embeddings(embed(demo_data / "val", tmp_path / "a.npy", tiny(), progress=False).out)
    b = read_embeddings(embed(demo_data / "val", tmp_path / "b.parquet", tiny(), progress=False).out)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert json.loads((tmp_path / "a.json").read_text())["dim"] == 64


def test_volumes_embed_bscan_by_bscan_with_their_columns(oct_volume_data, tmp_path):
    emb = read_embeddings(embed(oct_volume_data, tmp_path / "o.parquet", tiny(oct_frames="3"), progress=False).out)
    # 20 five-frame DICOMs + 4-frame .vol + 3-frame TIFF, 3 B-scans each
    assert len(emb.frame) == 22 * 3 and emb.frame["path"].str.contains("#frame=").all()
    vol = emb.frame[emb.frame["path"].str.contains("heyex.vol")]
    assert vol["path"].str.extract(r"#frame=(\d)")[0].tolist() == ["0", "2", "3"]
    assert set(vol["split"]) == {"test"} and set(vol["label"]) == {"amd"}
    assert emb.vectors.shape == (66, 64) and np.isfinite(emb.vectors).all()
