"""Typed settings (ats_wsi.settings): a dataclass is the schema; parse validates once."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ats_wsi.config import ConfigError
from ats_wsi.settings import parse, schema_of, to_dict
from ats_wsi.slides.settings import TrainConfig, TrainSettings


@dataclass
class Inner:
    size: int
    scale: float = 1.0
    name: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(1))
    tags: list[str] = field(default_factory=list)
    spec: dict | str = "plain"


def test_parse_builds_nested_objects_with_defaults() -> None:
    cfg = parse(Outer, {"inner": {"size": 3}, "spec": {"name": "x"}}, "a.yaml")
    assert isinstance(cfg.inner, Inner)
    assert (cfg.inner.size, cfg.inner.scale, cfg.inner.name) == (3, 1.0, None)
    assert cfg.spec == {"name": "x"} and cfg.tags == []
    assert to_dict(cfg) == {
        "inner": {"size": 3, "scale": 1.0, "name": None},
        "tags": [],
        "spec": {"name": "x"},
    }
    # The plain data round-trips (what a checkpoint stores and resume compares).
    assert parse(Outer, to_dict(cfg)) == cfg


def test_an_int_stays_as_written_where_a_float_is_expected() -> None:
    cfg = parse(Outer, {"inner": {"size": 1, "scale": 2}})
    assert cfg.inner.scale == 2 and isinstance(cfg.inner.scale, int)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inner": {"size": 1, "sise": 2}}, "a.yaml: unknown key 'inner.sise' (known here: "),
        ({"inner": {"size": "3"}}, "a.yaml: key 'inner.size' must be int, got str '3'"),
        ({"inner": {"size": True}}, "a.yaml: key 'inner.size' must be int, got bool True"),
        ({"inner": {}}, "a.yaml: missing required key 'inner.size'"),
        ({"inner": 3}, "a.yaml: inner. must be a mapping, got int"),
        ({"inner": {"size": 1}, "tags": "a"}, "a.yaml: key 'tags' must be list, got str 'a'"),
    ],
)
def test_errors_name_the_file_and_the_dotted_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(Outer, data, "a.yaml")
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_train_config_defaults_and_schema() -> None:
    cfg = parse(TrainConfig, None, "<defaults>")
    assert isinstance(cfg.train, TrainSettings) and cfg.train.epochs == 40
    assert cfg.model.attention_net == {"name": "histology", "width": 8}
    # Mutable defaults are not shared between configs.
    cfg.model.attention_net["width"] = 99
    assert parse(TrainConfig, {}).model.attention_net["width"] == 8
    schema = schema_of(TrainConfig)
    assert list(schema) == [
        "seed", "classes", "data", "demo", "slides", "model", "train", "baseline", "predict"
    ]
    assert schema["train"]["lr"] == ((int, float), 1e-3)
    assert schema["train"]["clip_norm"] == ((int, float, type(None)), 1.0)
