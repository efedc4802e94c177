"""Options generated from the settings dataclasses: one flag per field with the field's default and
help, Literal choices refused by name, list settings from comma text, and the short-run warmup rule."""
from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from click.testing import CliRunner

from retinafm.cli import _with_bounds, main
from retinafm.settings import (
    ConfigError,
    FinetuneSettings,
    PretrainSettings,
    RefineSettings,
    field_types,
    unwrap_optional,
)

VERBS = {"finetune": (FinetuneSettings, "retinafm.workflows.finetune", "finetune"),
         "pretrain": (PretrainSettings, "retinafm.workflows.pretrain", "pretrain"),
         "refine": (RefineSettings, "retinafm.workflows.refine", "refine")}


@pytest.fixture
def captured(monkeypatch):
    """Run a training verb's command line up to its settings: the workflow is replaced by a stub."""
    import importlib

    seen: dict[str, object] = {}

    def invoke(verb: str, *args: str):
        _, module, function = VERBS[verb]

        def stub(cfg, *_, **__):
            seen["cfg"] = cfg
            return type("Result", (), {"run_dir": cfg.out})()

        monkeypatch.setattr(importlib.import_module(module), function, stub)
        result = CliRunner().invoke(main, [verb, *args], catch_exceptions=False)
        return result, seen.get("cfg")

    return invoke


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_field_has_a_flag_with_its_default_and_help(verb, captured):
    cls = VERBS[verb][0]
    params = {p.name: p for p in main.commands[verb].params}
    for field in dataclasses.fields(cls):
        assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"
        if field.name == "resume":  # --resume RUN_DIR, a path, stands for it
            assert params["resume"].opts == ["--resume"]
            continue
        assert field.name in params, f"{verb} has no flag for {field.name}"
        assert params[field.name].opts[0] == "--" + field.name.replace("_", "-")
        assert params[field.name].help == _with_bounds(field.metadata["help"], field.metadata.get("bounds"))
    result, cfg = captured(verb)
    assert result.exit_code == 0, result.output
    assert cfg == cls(), f"{verb} with no flags differs from {cls.__name__}()"


def test_flags_are_typed_from_the_annotations(captured):
    result, cfg = captured("finetune", "--labels", " a, b ,", "--epochs", "7", "--warmup-epochs", "2", "--lr", "0.1",
                           "--fundus-crop", "--global-pool", "token", "--head", "mlp")
    assert result.exit_code == 0, result.output
    assert (cfg.labels, cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.fundus_crop, cfg.global_pool, cfg.head) == (
        ["a", "b"], 7, 2, 0.1, True, "token", "mlp")
    result, cfg = captured("refine", "--losses", "itc,mlm", "--loss-weights", "1,0.5")
    assert (cfg.losses, cfg.loss_weights) == (["itc", "mlm"], [1.0, 0.5])
    assert cfg.loss_weight_map() == {"itc": 1.0, "mlm": 0.5}
    result, cfg = captured("pretrain", "--no-norm-pix-loss", "--splits", "train,val", "--method", "dino")
    assert (cfg.norm_pix_loss, cfg.splits, cfg.split_list(), cfg.method) == (False, ["train", "val"],
                                                                             ["train", "val"], "dino")


@pytest.mark.parametrize("verb,flag", [("finetune", "head"), ("finetune", "adaptation"), ("finetune", "lp_mode"),
                                       ("finetune", "loss"), ("finetune", "global_pool"),
                                       ("finetune", "modality"), ("finetune", "precision"),
                                       ("pretrain", "method"), ("refine", "precision")])
def test_literal_settings_refuse_other_values(verb, flag, captured, tmp_path):
    cls = VERBS[verb][0]
    choices = typing.get_args(unwrap_optional(field_types(cls)[flag])[0])
    assert choices, f"{cls.__name__}.{flag} is not a Literal"
    option = "--" + flag.replace("_", "-")
    result, _ = captured(verb, option, "nonsense")
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output and "'nonsense' is not one of" in result.output
    assert all(repr(c) in result.output for c in choices) and "Traceback" not in result.output
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({flag: "nonsense"}))
    result, _ = captured(verb, "--config", str(config))
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output


def test_task_choices_are_the_task_registry(captured, tmp_path):
    from retinafm.tasks import TASKS

    result, _ = captured("finetune", "--task", "nonsense")
    assert result.exit_code == 2
    assert "Invalid value for '--task'" in result.output and "'nonsense' is not one of" in result.output
    assert all(repr(name) in result.output for name in TASKS) and "Traceback" not in result.output
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": "nonsense"}))
    result, _ = captured("finetune", "--config", str(config))
    assert result.exit_code == 2 and "Invalid value for '--task'" in result.output


def test_bad_list_of_numbers_is_one_clear_line(captured):
    result, _ = captured("refine", "--loss-weights", "1,heavy")
    assert result.exit_code == 2
    assert "Invalid value for '--loss-weights'" in result.output and "Traceback" not in result.output
    with pytest.raises(ConfigError, match="--loss-weights must be numbers"):
        RefineSettings(loss_weights="1,heavy").loss_weight_map()


@pytest.mark.parametrize("labels", ["a, b", ["a", "b"]])
def test_config_files_give_lists_as_comma_text_or_yaml_lists(labels, captured, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"labels": labels, "task": "multilabel", "manifest": "m.csv"}))
    result, cfg = captured("finetune", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert cfg.labels == ["a", "b"] and cfg.names_list() == ["a", "b"]
    # A run's config.yaml round-trips: what to_dict writes is what the dataclass reads.
    assert FinetuneSettings(**dataclasses.asdict(cfg)) == cfg


def test_a_default_warmup_shrinks_to_a_short_run():
    cfg = FinetuneSettings(epochs=3)
    notes = cfg.fit_defaults(given=())
    assert cfg.warmup_epochs == 3 and len(notes) == 1
    assert "--warmup-epochs" in notes[0] and "--epochs 3" in notes[0] and "\n" not in notes[0]
    chosen = FinetuneSettings(out="r", data_path="d", epochs=3)
    assert chosen.fit_defaults(given={"warmup_epochs"}) == [] and chosen.warmup_epochs == 10
    with pytest.raises(ConfigError, match=r"--warmup-epochs must be between 0 and --epochs \(3\)"):
        chosen.validate()
    fits = FinetuneSettings(epochs=20)
    assert fits.fit_defaults() == [] and fits.warmup_epochs == 10


def test_refine_warmup_follows_the_same_rule(captured):
    result, cfg = captured("refine", "--epochs", "2", "--warmup-epochs", "5")
    assert cfg.warmup_epochs == 5 and "note:" not in result.output  # chosen: left for validate() to refuse
    with pytest.raises(ConfigError, match="--warmup-epochs must be between 0 and --epochs"):
        dataclasses.replace(cfg, pairs="p.csv", text_model="t", out="o").validate()
    cfg = RefineSettings(epochs=3, warmup_epochs=4)
    assert cfg.fit_defaults() and cfg.warmup_epochs == 3


TINY = ["--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--batch-size", "16",
        "--num-workers", "0", "--device", "cpu", "--bootstrap", "0", "--randaug-magnitude", "0", "--reprob", "0"]


def test_a_short_finetune_runs_without_warmup_epochs(demo_data, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["finetune", "--data-path", str(demo_data), "--out", str(tmp_path / "run"),
                               "--epochs", "1", *TINY], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--warmup-epochs defaults to 10" in notes[0] and "--epochs 1" in notes[0]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["epochs"], saved["warmup_epochs"]) == (1, 1)

    # A warmup the user chose, as a flag or in a --config file, is refused as before.
    res = runner.invoke(main, ["finetune", "--data-path", str(demo_data), "--out", str(tmp_path / "r2"),
                               "--epochs", "1", "--warmup-epochs", "5", *TINY])
    assert res.exit_code == 2 and "--warmup-epochs must be between 0 and --epochs (1)" in res.output
    config = tmp_path / "c.yaml"
    config.write_text("warmup_epochs: 5\nepochs: 1\n")
    res = runner.invoke(main, ["finetune", "--config", str(config), "--data-path", str(demo_data),
                               "--out", str(tmp_path / "r3"), *TINY])
    assert res.exit_code == 2 and "--warmup-epochs must be between 0 and --epochs (1)" in res.output
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


@pytest.mark.parametrize("verb,cls", [("split", "SplitSettings"), ("compare", "CompareSettings"),
                                      ("import", "ImportSettings")])
def test_smaller_verbs_take_their_options_from_settings(verb, cls):
    import retinafm.settings as settings

    cls = getattr(settings, cls)
    params = {p.name: p for p in main.commands[verb].params if p.param_type_name == "option"}
    assert set(params) == {f.name for f in dataclasses.fields(cls)}
    for field in dataclasses.fields(cls):
        param = params[field.name]
        assert param.help == _with_bounds(field.metadata["help"], field.metadata.get("bounds"))
        assert param.required == bool(field.metadata.get("required"))
        if not param.required:
            assert param.default == field.default


def test_split_workflow_takes_its_settings(tmp_path):
    import pandas as pd

    from retinafm.settings import SplitSettings
    from retinafm.workflows.split import check_leakage, split

    frame = pd.DataFrame({"path": [f"img_{i}.png" for i in range(80)],
                          "patient_id": [f"p{i // 2:02d}" for i in range(80)],
                          "label": ["dr" if (i // 2) % 3 == 0 else "normal" for i in range(80)]})
    frame.to_csv(tmp_path / "m.csv", index=False)
    cfg = SplitSettings(manifest=str(tmp_path / "m.csv"), out=str(tmp_path / "s.csv"), seed=3)
    result = split(cfg)
    written = pd.read_csv(tmp_path / "s.csv")
    assert list(written["path"]) == list(frame["path"]) and set(written["split"]) == {"train", "val", "test"}
    assert (written.groupby("patient_id")["split"].nunique() == 1).all()
    assert result.info["groups"] == 40 and len(result.manifest) == 80
    assert check_leakage(SplitSettings(manifest=str(tmp_path / "s.csv"))).report.empty
    with pytest.raises(ConfigError, match="give --out FILE.csv"):
        split(SplitSettings(manifest=str(tmp_path / "m.csv")))
