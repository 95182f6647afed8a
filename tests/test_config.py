"""Config schema checks: YAML loading, choices, what a resume may change."""

from __future__ import annotations

from pathlib import Path

import pytest

from ats_wsi.config import (
    REQUIRED,
    ConfigError,
    check_choices,
    check_resume_config,
    load_yaml_config,
)


def test_load_yaml_config_errors_name_file_and_key(tmp_path: Path) -> None:
    schema = {
        "seed": ((int,), 0),
        "train": {"lr": ((int, float), 1e-3), "epochs": ((int,), REQUIRED)},
    }
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\n  lr: 1\n")
    assert load_yaml_config(p, schema) == {"seed": 0, "train": {"lr": 1.0, "epochs": 3}}
    cases = {
        "train:\n  epochs: 3\n  lrr: 1\n": "unknown key 'train.lrr'",
        "train:\n  epochs: 3\n  lr: fast\n": "'train.lr' must be int or float, got str",
        "seed: true\ntrain:\n  epochs: 3\n": "'seed' must be int, got bool",
        "train: {}\n": "missing required key 'train.epochs'",
        "train: 3\n": "train. must be a mapping",
        "seed: !!python/object/apply:os.system ['echo hi']\n": "not valid YAML",
    }
    for text, msg in cases.items():
        p.write_text(text)
        with pytest.raises(ConfigError, match=str(p).replace(".", r"\.") + ".*"):
            load_yaml_config(p, schema)
        with pytest.raises(ConfigError) as info:
            load_yaml_config(p, schema)
        assert msg in str(info.value), (text, str(info.value))


def test_check_choices_names_the_key() -> None:
    cfg = {"model": {"sampler": "topk"}}
    check_choices(cfg, "c.yaml", {("model", "sampler"): ("topk", "without_replacement")})
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'model\.sampler' must be one of"):
        check_choices(cfg, "c.yaml", {("model", "sampler"): ("without_replacement",)})


def test_check_resume_config_allows_only_resumable_paths() -> None:
    old = {"seed": 0, "train": {"epochs": 2, "lr": 1e-3}, "report": {"n": 1}}
    resumable = {("train", "epochs"), ("report",)}
    new = {"seed": 0, "train": {"epochs": 5, "lr": 1e-3}, "report": {"n": 4, "extra": 1}}
    check_resume_config(old, new, "run", resumable=resumable)
    with pytest.raises(ConfigError, match="run: cannot resume, 'train.epochs' was 2 and is now 5"):
        check_resume_config(old, new, "run")
    changed = {**new, "train": {"epochs": 5, "lr": 1e-2}}
    with pytest.raises(ConfigError, match="'train.lr' was 0.001 and is now 0.01"):
        check_resume_config(old, changed, "run", resumable=resumable)


def test_check_resume_config_reports_differences_in_a_fixed_order() -> None:
    # old's keys in old's order, then keys only new has in new's order: the first difference
    # reported does not depend on PYTHONHASHSEED (a set of the keys did, for half of all seeds).
    old = {"zeta": 1, "alpha": {"y": 1, "b": 1}}
    new = {"omega": 1, "zeta": 2, "alpha": {"b": 2, "y": 2}, "beta": 1}
    with pytest.raises(ConfigError, match="'zeta' was 1 and is now 2"):
        check_resume_config(old, new, "run")
    with pytest.raises(ConfigError, match="'alpha.y' was 1 and is now 2"):
        check_resume_config(old, new, "run", resumable={("zeta",)})
    with pytest.raises(ConfigError, match="'omega' was None and is now 1"):
        check_resume_config(old, new, "run", resumable={("zeta",), ("alpha",)})
    with pytest.raises(ConfigError, match="'beta' was None and is now 1"):
        check_resume_config(old, new, "run", resumable={("zeta",), ("alpha",), ("omega",)})
