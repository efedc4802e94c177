from __future__ import annotations

from collections import Counter

import pytest

from retinafm.data.splits import parse_ratios, stratified_split


def test_parse_ratios():
    assert parse_ratios("0.7,0.15,0.15") == (0.7, 0.15, 0.15)
    for bad in ["0.7,0.3", "a,b,c", "0.5,0.5,0.5", "1,0,0"]:
        with pytest.raises(ValueError, match="--split"):
            parse_ratios(bad)


def test_stratified_and_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    a = stratified_split(labels, (0.7, 0.15, 0.15), seed=1)
    assert a == stratified_split(labels, (0.7, 0.15, 0.15), seed=1)
    assert a != stratified_split(labels, (0.7, 0.15, 0.15), seed=2)
    train = Counter(y for y, s in zip(labels, a, strict=True) if s == "train")
    assert train == {0: 35, 1: 21, 2: 14}
    assert Counter(a) == {"train": 70, "val": 15, "test": 15}


def test_groups_never_straddle_splits():
    labels = [i % 2 for i in range(60)]
    groups = [f"p{i // 3}" for i in range(60)]
    a = stratified_split(labels, (0.6, 0.2, 0.2), seed=0, groups=groups)
    by_group: dict[str, set] = {}
    for g, s in zip(groups, a, strict=True):
        by_group.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())


def test_too_small_to_split():
    with pytest.raises(ValueError, match="cannot split"):
        stratified_split([0], (0.6, 0.2, 0.2))


# --- split_manifest / leakage_report / `retinafm split` ---------------------------------------

def _patients_frame(n_patients: int = 60, seed: int = 0):
    """3 classes, 2-4 images per patient; one class per patient; ids with leading zeros."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for k in range(int(rng.integers(2, 5))):
            rows.append({"path": f"img/p{p}_{k}.png", "patient_id": f"{p:03d}", "label": "abc"[p % 3]})
    return pd.DataFrame(rows)


def _splits_per_patient(frame) -> dict:
    return frame.groupby("patient_id")["split"].agg(lambda s: set(s)).to_dict()


def test_split_manifest_keeps_each_patient_in_one_split():
    from retinafm.data.splits import split_manifest

    frame = _patients_frame()
    out = split_manifest(frame, seed=3)
    assert list(out.columns) == ["path", "split", "patient_id", "label"]
    assert "split" not in frame.columns  # a copy
    assert (out["path"] == frame["path"]).all()
    assert set(out["split"]) == {"train", "val", "test"}
    assert all(len(s) == 1 for s in _splits_per_patient(out).values())


def test_split_manifest_rows_without_id_are_their_own_group():
    from retinafm.data.splits import split_manifest

    frame = _patients_frame(30)
    frame.loc[:9, "patient_id"] = None
    frame.loc[10:14, "patient_id"] = "  "
    out = split_manifest(frame, seed=0)
    assert out.attrs["split_info"]["groups"] == frame["patient_id"].iloc[15:].nunique() + 15
    known = out.iloc[15:]
    assert all(len(s) == 1 for s in _splits_per_patient(known).values())


def test_split_manifest_stratifies_by_label():
    from retinafm.data.splits import split_manifest

    frame = _patients_frame(60)
    out = split_manifest(frame, seed=0)
    assert out.attrs["split_info"]["stratified_by"] == "label"
    patients = out.drop_duplicates("patient_id")
    for name, part in patients.groupby("split"):
        share = part["label"].value_counts(normalize=True)
        assert set(share.index) == {"a", "b", "c"}, name
        assert (abs(share - 1 / 3) < 0.12).all(), (name, share.to_dict())


def test_split_manifest_multilabel_and_explicit_stratification():
    import pandas as pd

    from retinafm.data.splits import split_manifest

    n = 80
    frame = pd.DataFrame({"path": [f"x{i}.png" for i in range(n)], "patient_id": [str(i // 2) for i in range(n)],
                          "dr": [str((i // 2) % 2) for i in range(n)],
                          "amd": ["1" if (i // 2) % 5 == 0 else "0" for i in range(n)],
                          "age": [str(40 + i) for i in range(n)], "site": ["A", "B"] * (n // 2)})
    out = split_manifest(frame, seed=0)
    assert "rarest positive" in out.attrs["split_info"]["stratified_by"]
    assert "dr" in out.attrs["split_info"]["stratified_by"] and "age" not in out.attrs["split_info"]["stratified_by"]
    assert all((out.loc[out["split"] == s, "amd"] == "1").any() for s in ("train", "val", "test"))
    assert split_manifest(frame, stratify="age").attrs["split_info"]["stratified_by"] == "quintiles of age"
    assert split_manifest(frame, stratify="none").attrs["split_info"]["stratified_by"].startswith("nothing")
    assert split_manifest(frame.drop(columns=["dr", "amd"])).attrs["split_info"]["stratified_by"].startswith("nothing")


def test_split_manifest_is_seeded():
    from retinafm.data.splits import split_manifest

    frame = _patients_frame()
    a = split_manifest(frame, seed=1)["split"].tolist()
    assert a == split_manifest(frame, seed=1)["split"].tolist()
    assert a != split_manifest(frame, seed=2)["split"].tolist()


@pytest.mark.parametrize("ratios", [(0.7, 0.15, 0.15), "0.6,0.2,0.2", (0.5, 0.25, 0.25)])
def test_split_manifest_respects_ratios_by_patient(ratios):
    from retinafm.data.splits import parse_ratios, split_manifest

    frame = _patients_frame(100)
    out = split_manifest(frame, ratios=ratios, seed=0)
    patients = out.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    expected = parse_ratios(ratios) if isinstance(ratios, str) else ratios
    for name, want in zip(("train", "val", "test"), expected, strict=True):
        assert abs(patients[name] - want) < 0.04, (name, patients.to_dict())


def test_split_manifest_replaces_an_existing_split_and_groups_row_by_row():
    from retinafm.data.splits import split_manifest

    frame = _patients_frame().assign(split="train")[["split", "path", "patient_id", "label"]]
    out = split_manifest(frame, by=None, seed=0)
    assert list(out.columns) == list(frame.columns)
    assert set(out["split"]) == {"train", "val", "test"}
    assert out.attrs["split_info"]["groups"] == len(frame)


def test_split_manifest_errors_name_the_column():
    from retinafm.data.splits import SplitError, split_manifest

    frame = _patients_frame(20)
    with pytest.raises(SplitError, match="'site' .*--by"):
        split_manifest(frame, by="site")
    with pytest.raises(SplitError, match="'grade' .*--stratify"):
        split_manifest(frame, stratify="grade")
    with pytest.raises(SplitError, match="--ratios"):
        split_manifest(frame, ratios="0.5,0.5")
    with pytest.raises(SplitError, match="2 patient_id group"):
        split_manifest(frame[frame["patient_id"].isin(["000", "001"])])
    with pytest.raises(SplitError, match="no rows"):
        split_manifest(frame.iloc[:0])
    assert issubclass(SplitError, ValueError)


def test_leakage_report_finds_exactly_the_injected_leaks():
    from retinafm.data.splits import leakage_report, split_manifest

    out = split_manifest(_patients_frame(), seed=0)
    assert leakage_report(out).empty
    assert list(leakage_report(out).columns[:3]) == ["patient_id", "splits", "images"]
    leaky = out.copy()
    injected = {}
    for pid, new in (("004", "val"), ("017", "test"), ("033", "train")):
        rows = leaky.index[leaky["patient_id"] == pid]
        old = leaky.loc[rows[0], "split"]
        new = new if new != old else "val" if old != "val" else "test"
        leaky.loc[rows[0], "split"] = new
        injected[pid] = (old, new, len(rows))
    leaky.loc[leaky.index[-1], "patient_id"] = None  # an empty id never leaks
    report = leakage_report(leaky)
    assert sorted(report["patient_id"]) == sorted(injected)
    for _, row in report.iterrows():
        old, new, images = injected[row["patient_id"]]
        assert set(row["splits"].split(",")) == {old, new}
        assert row["images"] == images
        assert row[f"images_{new}"] == 1 and row[f"images_{old}"] == images - 1
    renamed = leaky.rename(columns={"patient_id": "subject"})
    assert list(leakage_report(renamed, by="subject")["subject"]) == list(report["patient_id"])


def _write(frame, path):
    frame.to_csv(path, index=False)
    return str(path)


def _cli(*args):
    from click.testing import CliRunner

    from retinafm.cli import main

    return CliRunner().invoke(main, ["split", *map(str, args)])


def test_cli_split_writes_the_manifest(tmp_path):
    import pandas as pd

    frame = _patients_frame().assign(extra="NA")
    manifest = _write(frame, tmp_path / "m.csv")
    out = tmp_path / "m_split.csv"
    res = _cli("--manifest", manifest, "--out", out, "--seed", 4)
    assert res.exit_code == 0, res.output
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(written.columns) == ["path", "split", "patient_id", "label", "extra"]
    assert written["patient_id"].iloc[0] == "000" and (written["extra"] == "NA").all()
    assert (written["path"] == frame["path"]).all()
    assert all(len(s) == 1 for s in _splits_per_patient(written).values())
    assert "60 patient_id groups" in res.output and "stratified by label" in res.output
    for word in ("train", "val", "test", "groups", "images"):
        assert word in res.output
    again = _cli("--manifest", manifest, "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output
    assert _cli("--manifest", manifest, "--out", out, "--overwrite", "--seed", 4).exit_code == 0


def test_cli_split_check_reports_leakage(tmp_path):
    import pandas as pd

    from retinafm.data.splits import split_manifest

    frame = split_manifest(_patients_frame(), seed=0)
    clean = _write(frame, tmp_path / "clean.csv")
    res = _cli("--manifest", clean, "--check")
    assert res.exit_code == 0, res.output
    assert "no leakage" in res.output
    leaky = frame.copy()
    row = leaky.index[leaky["patient_id"] == "007"][0]
    leaky.loc[row, "split"] = "test" if leaky.loc[row, "split"] != "test" else "train"
    report_path = tmp_path / "leaks.csv"
    res = _cli("--manifest", _write(leaky, tmp_path / "leaky.csv"), "--check", "--out", report_path)
    assert res.exit_code == 1, res.output
    assert "007" in res.output and "1 patient_id" in res.output
    assert pd.read_csv(report_path, dtype=str)["patient_id"].tolist() == ["007"]


def test_cli_split_check_lists_twenty_and_counts_the_rest(tmp_path):
    from retinafm.data.splits import split_manifest

    frame = split_manifest(_patients_frame(), seed=0)
    for pid in frame["patient_id"].unique()[:25]:
        row = frame.index[frame["patient_id"] == pid][0]
        frame.loc[row, "split"] = "val" if frame.loc[row, "split"] != "val" else "train"
    res = _cli("--manifest", _write(frame, tmp_path / "m.csv"), "--check")
    assert res.exit_code == 1
    assert "25 patient_id" in res.output and "and 5 more" in res.output


def test_cli_split_refuses_an_existing_split_without_resplit(tmp_path):
    from retinafm.data.splits import split_manifest

    manifest = _write(split_manifest(_patients_frame(), seed=0), tmp_path / "m.csv")
    res = _cli("--manifest", manifest, "--out", tmp_path / "new.csv")
    assert res.exit_code == 2
    assert "already has a split column" in res.output and "--resplit" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "new.csv").exists()
    res = _cli("--manifest", manifest, "--out", tmp_path / "new.csv", "--resplit", "--seed", 9)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "new.csv").exists()


def test_cli_split_missing_by_column(tmp_path):
    manifest = _write(_patients_frame(), tmp_path / "m.csv")
    for extra in ([], ["--check"]):
        res = _cli("--manifest", manifest, "--out", tmp_path / "x.csv", "--by", "subject", *extra)
        assert res.exit_code == 2, res.output
        assert "'subject'" in res.output and "--by" in res.output
        assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert not (tmp_path / "x.csv").exists()
    res = _cli("--manifest", _write(_patients_frame().drop(columns="patient_id"), tmp_path / "n.csv"),
               "--out", tmp_path / "x.csv")
    assert res.exit_code == 2 and "'patient_id'" in res.output and "--by none" in res.output
