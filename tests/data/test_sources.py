"""Folder and manifest sources: class order, split rules and the messages users see."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retinafm.data.sources import (
    DataSourceError,
    load_folder,
    load_labelled,
    load_manifest,
    parse_label_map,
)
from retinafm.tasks import get_task


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def _tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                _img(root / split / cls / f"{i}.png")
    return root


def test_split_folders_sorted_classes_from_train(tmp_path):
    root = _tree(tmp_path, {"train": {"normal": 3, "amd": 2}, "val": {"amd": 1, "normal": 1}, "test": {"normal": 2}})
    (root / "train" / "normal" / "notes.txt").write_text("ignored")
    data = load_folder(root)
    assert data.class_names == ["amd", "normal"]
    assert len(data.split("train")) == 5 and len(data.split("val")) == 2 and len(data.split("test")) == 2
    assert {s.label for s in data.split("test")} == {1}
    assert data.counts().loc["train", "amd"] == 2


def test_class_missing_from_train_is_named(tmp_path):
    root = _tree(tmp_path, {"train": {"normal": 2, "amd": 2}, "val": {"glaucoma": 1}})
    with pytest.raises(DataSourceError, match="class 'glaucoma' is in .*val but not in"):
        load_folder(root)


def test_empty_train_class_folder_is_named(tmp_path):
    root = _tree(tmp_path, {"train": {"normal": 2}})
    (root / "train" / "amd").mkdir()
    with pytest.raises(DataSourceError, match="amd has no image files"):
        load_folder(root)


def test_no_split_folders_needs_ratios_then_splits_stratified(tmp_path):
    root = _tree(tmp_path, {"": {"a": 20, "b": 20}})
    with pytest.raises(DataSourceError, match="--split 0.7,0.15,0.15"):
        load_folder(root)
    data = load_folder(root, split_ratios="0.6,0.2,0.2", seed=3)
    assert data.auto_split
    table = data.table()
    counts = table.groupby(["split", "label"]).size()
    assert counts["train"].tolist() == [12, 12] and counts["val"].tolist() == [4, 4]
    again = load_folder(root, split_ratios="0.6,0.2,0.2", seed=3).table()
    pd.testing.assert_frame_equal(table, again)  # seeded


def test_manifest_relative_paths_and_checks(tmp_path):
    for name in ["x1", "x2", "x3", "x4"]:
        _img(tmp_path / "imgs" / f"{name}.png")
    csv = tmp_path / "m.csv"
    csv.write_text("path,split,label,patient_id\nimgs/x1.png,train,dr,p1\nimgs/x2.png,train,normal,p2\n"
                   "imgs/x3.png,VAL,dr,p3\nimgs/x4.png,test,normal,p4\n")
    data = load_manifest(csv)
    assert data.class_names == ["dr", "normal"]
    assert data.samples[0].path == str(tmp_path / "imgs" / "x1.png") and data.samples[0].patient_id == "p1"
    assert [s.split for s in data.samples] == ["train", "train", "val", "test"]

    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,dr\n")
    with pytest.raises(DataSourceError, match="lacks column.*path.*split"):
        load_manifest(bad)
    bad.write_text("path,split,label\na.png,train,dr\nb.png,train,\n")
    with pytest.raises(DataSourceError, match="empty 'label' on line.*3"):
        load_manifest(bad)
    bad.write_text("path,split,label\na.png,train,dr\na.png,val,dr\n")
    with pytest.raises(DataSourceError, match="duplicate path"):
        load_manifest(bad)
    bad.write_text("path,split,label\na.png,train,dr\nb.png,holdout,dr\n")
    with pytest.raises(DataSourceError, match="unknown split"):
        load_manifest(bad)
    bad.write_text("path,split,label\na.png,train,dr\nb.png,test,amd\n")
    with pytest.raises(DataSourceError, match="amd.*do not appear in the train split"):
        load_manifest(bad)
    with pytest.raises(DataSourceError, match="does not exist"):
        load_manifest(tmp_path / "missing.csv")


def test_manifest_auto_split_keeps_patients_together(tmp_path):
    rows = [{"path": f"{p}_{e}.png", "label": "dr" if p % 2 else "normal", "patient_id": f"p{p}"}
            for p in range(30) for e in ("L", "R")]
    csv = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    data = load_manifest(csv, split_ratios="0.6,0.2,0.2")
    per_patient = data.table().groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    assert set(data.table()["split"]) == {"train", "val", "test"}


def test_load_labelled_and_fixed_class_order(tmp_path):
    root = _tree(tmp_path, {"train": {"b": 1, "a": 1}, "val": {"a": 1}})
    assert load_labelled(data_path=str(root)).class_names == ["a", "b"]
    fixed = load_folder(root, class_names=["b", "a", "c"])  # a checkpoint's order, for evaluation
    assert fixed.class_names == ["b", "a", "c"]
    assert sorted((s.split, fixed.class_names[s.label]) for s in fixed.samples) == [
        ("train", "a"), ("train", "b"), ("val", "a")]
    with pytest.raises(DataSourceError, match="not among the model's classes"):
        load_folder(root, class_names=["a"])
    flat = _tree(tmp_path / "flat", {"": {"a": 2}})
    assert [s.split for s in load_folder(flat, class_names=["a", "b"], flat_split="test").samples] == ["test", "test"]
    with pytest.raises(DataSourceError, match="--data-path DIR or --manifest"):
        load_labelled()


def _write_manifest(tmp_path, text: str):
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


def test_multilabel_manifest_columns_missing_cells_and_bad_values(tmp_path):
    csv = _write_manifest(tmp_path, "path,split,patient_id,drusen,srf\n"
                                    "a.png,train,p1,1,0\nb.png,train,p2,0,\nc.png,val,p3,1,1\nd.png,test,p4,0,1\n")
    data = load_manifest(csv, targets=get_task("multilabel").targets)
    assert data.class_names == ["drusen", "srf"]  # every non-reserved column
    assert data.samples[1].targets[0] == 0.0 and np.isnan(data.samples[1].targets[1])  # empty = unknown
    assert data.samples[0].patient_id == "p1" and data.samples[0].label is None
    assert list(data.counts().columns) == ["images", "drusen", "srf"]
    assert load_manifest(csv, targets=get_task("multilabel").targets, class_names=["srf"]).samples[3].targets == (1.0,)
    with pytest.raises(DataSourceError, match=r"no column\(s\) \['cnv'\]"):
        load_manifest(csv, targets=get_task("multilabel").targets, class_names=["srf", "cnv"])
    bad = _write_manifest(tmp_path, "path,split,drusen\na.png,train,2\nb.png,train,yes\n")
    with pytest.raises(DataSourceError, match=r"'drusen' must hold 0 or 1.*line\(s\) 2, 3"):
        load_manifest(bad, targets=get_task("multilabel").targets)


def test_regression_manifest_numbers_and_auto_split(tmp_path):
    rows = "\n".join(f"{i}.png,{40 + i},{'' if i % 10 == 0 else 120 + i}" for i in range(60))
    csv = _write_manifest(tmp_path, "path,age,sbp\n" + rows + "\n")
    data = load_manifest(csv, split_ratios="0.6,0.2,0.2", targets=get_task("regression").targets,
                         class_names=["age", "sbp"])
    assert data.targets.task == "regression" and data.auto_split
    assert sorted(len(data.split(s)) for s in ("train", "val", "test")) == [12, 12, 36]
    ages = {s.split: [] for s in data.samples}
    for s in data.samples:
        ages[s.split].append(s.targets[0])
    # Stratified by quintile of the first target: every split spans the range.
    assert all(min(v) < 52 and max(v) > 88 for v in ages.values())
    assert sum(np.isnan(s.targets[1]) for s in data.samples) == 6
    table = data.table()
    assert list(table.columns) == ["path", "split", "age", "sbp", "patient_id"]
    bad = _write_manifest(tmp_path, "path,split,age\na.png,train,forty\n")
    with pytest.raises(DataSourceError, match="'age' must hold a number"):
        load_manifest(bad, targets=get_task("regression").targets)
    for value in ("inf", "-inf", "1e999"):  # a target no loss can use: refused with its line, not trained on
        bad = _write_manifest(tmp_path, f"path,split,age\na.png,train,40\nb.png,train,{value}\n")
        with pytest.raises(DataSourceError, match=r"'age' must hold a number.*line\(s\) 3 \(value -?inf\)"):
            load_manifest(bad, targets=get_task("regression").targets)


def test_tasks_other_than_multiclass_need_a_manifest(tmp_path):
    with pytest.raises(DataSourceError, match="--task regression needs a --manifest"):
        load_labelled(data_path=str(tmp_path), targets=get_task("regression").targets)


def test_parse_label_map():
    assert parse_label_map("no_dr=normal, mild=dr,moderate=dr") == {"no_dr": "normal", "mild": "dr", "moderate": "dr"}
    assert parse_label_map(None) == {} and parse_label_map("") == {}
    for bad in ("no_dr", "=normal", "a=", "a=b,a=c"):
        with pytest.raises(DataSourceError, match="--label-map"):
            parse_label_map(bad)


def test_label_map_renames_and_merges_an_external_sets_classes(tmp_path):
    root = _tree(tmp_path / "ext", {"test": {"none": 2, "mild": 1, "moderate": 1}})
    data = load_folder(root, class_names=["normal", "dr"], label_map={"none": "normal", "mild": "dr", "moderate": "dr"})
    assert sorted(data.class_names[s.label] for s in data.split("test")) == ["dr", "dr", "normal", "normal"]
    with pytest.raises(DataSourceError, match="'moderate'.*--label-map moderate=<model class>"):
        load_folder(root, class_names=["normal", "dr"], label_map={"none": "normal", "mild": "dr"})
    with pytest.raises(DataSourceError, match=r"--label-map names \['severe'\].*mild, moderate, none"):
        load_folder(root, class_names=["normal", "dr"], label_map={"severe": "dr"})
    csv = _write_manifest(tmp_path, "path,split,label\na.png,test,none\nb.png,test,mild\n")
    data = load_manifest(csv, class_names=["normal", "dr"], label_map={"none": "normal", "mild": "dr"})
    assert [data.class_names[s.label] for s in data.samples] == ["normal", "dr"]
    with pytest.raises(DataSourceError, match="--label-map mild=<model class>"):
        load_manifest(csv, class_names=["normal", "dr"], label_map={"none": "normal"})


def test_external_manifest_columns_renamed_and_absent_ones_unknown(tmp_path):
    csv = _write_manifest(tmp_path, "path,split,DRUSEN\na.png,test,1\nb.png,test,0\n")
    data = load_manifest(csv, targets=get_task("multilabel").targets, class_names=["drusen", "srf"],
                         label_map={"DRUSEN": "drusen"},
                         absent_unknown=True)
    assert data.samples[0].targets[0] == 1.0 and np.isnan(data.samples[0].targets[1])
    with pytest.raises(DataSourceError, match=r"no column\(s\) \['srf'\]"):
        load_manifest(csv, targets=get_task("multilabel").targets, class_names=["drusen", "srf"],
                      label_map={"DRUSEN": "drusen"})
