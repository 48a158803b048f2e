"""Tests of mmkit/config.py: precedence, coercion, unknown keys with lines and suggestions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from mmkit.config import config_dict, config_keys, load_config, save_config
from mmkit.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str = "run"
    epochs: int = 1
    mode: Literal["fast", "exact"] = "fast"
    layers: list[int] = field(default_factory=lambda: [0, 1])
    limit: Optional[int] = None
    verbose: bool = False
    optim: Optim = field(default_factory=Optim)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"expected >= 1, got {self.epochs}", field="epochs")


def test_defaults():
    assert load_config(Cfg) == Cfg()


def test_precedence_file_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 2\nname: from-file\noptim:\n  lr: 0.5\n")
    cfg = load_config(Cfg, file=f, flags={"name": "from-flag", "epochs": None, "optim.lr": 0.25},
                      sets=["optim.lr=0.125", "layers=[3, 4]"])
    assert cfg.epochs == 2  # a flag left at None does not override the file
    assert cfg.name == "from-flag"
    assert cfg.optim.lr == 0.125
    assert cfg.layers == [3, 4]
    assert cfg.optim.betas == (0.9, 0.999)  # untouched nested default survives a partial section


@pytest.mark.parametrize("item, attr, expected", [
    ("epochs=3", "epochs", 3),
    ("verbose=true", "verbose", True),
    ("limit=null", "limit", None),
    ("limit=7", "limit", 7),
    ("layers=1,2,5", "layers", [1, 2, 5]),
    ("optim.betas=[0.8, 0.9]", "optim", Optim(betas=(0.8, 0.9))),
    ("mode=exact", "mode", "exact"),
    ("name=42", "name", "42"),
])
def test_set_values_are_parsed_and_typed(item, attr, expected):
    assert getattr(load_config(Cfg, sets=[item]), attr) == expected


@pytest.mark.parametrize("item, message", [
    ("epochs=three", "epochs: expected an integer, got 'three'"),
    ("mode=exakt", "expected one of fast, exact, got 'exakt' (did you mean 'exact'?)"),
    ("verbose=maybe", "expected true or false"),
    ("optim.betas=[1]", "expected 2 values, got 1"),
    ("epochs=0", "epochs: expected >= 1, got 0"),
    ("epochs", "--set: expected key=value"),
])
def test_bad_values(item, message):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, sets=[item])
    assert message in str(err.value)


def test_unknown_key_in_file_names_line_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\noptim:\n  lr: 1\n  beta: [0.1, 0.2]\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, file=f)
    assert str(err.value).startswith(f"{f}:4: optim.beta: unknown key (did you mean 'betas'?)")


def test_unknown_key_from_set_and_flags():
    with pytest.raises(ConfigError, match=r"--set epoch: unknown key \(did you mean 'epochs'\?\)"):
        load_config(Cfg, sets=["epoch=2"])
    with pytest.raises(ConfigError, match="optim.momentum: unknown key"):
        load_config(Cfg, flags={"optim.momentum": 0.9})


def test_malformed_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nepochs: [1\n")
    with pytest.raises(ConfigError, match=rf"{f}:\d+: yaml: malformed YAML"):
        load_config(Cfg, file=f)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Cfg, file=tmp_path / "nope.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(Cfg, file=f)


def test_save_round_trip(tmp_path):
    cfg = load_config(Cfg, sets=["optim.betas=[0.5, 0.6]", "limit=3"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text()) == config_dict(cfg)
    assert load_config(Cfg, file=path) == cfg


def test_config_keys():
    assert config_keys(Cfg) == ["name", "epochs", "mode", "layers", "limit", "verbose", "optim.lr", "optim.betas"]


def test_errors_point_at_the_source_that_set_the_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, file=f, flags={"epochs": "x"})
    assert str(err.value) == "epochs: expected an integer, got 'x'"  # the flag, not c.yaml:1
    with pytest.raises(ConfigError, match=r"^--set optt: unknown key \(did you mean 'optim'\?\)"):
        load_config(Cfg, sets=["optt.lr=3"])


def test_a_section_keeps_its_parents_defaults_when_one_key_is_set():
    @dataclass
    class Method:
        optim: Optim = field(default_factory=lambda: Optim(lr=5e-6, betas=(0.8, 0.9)))

    cfg = load_config(Method, sets=["optim.lr=1e-4"])
    assert cfg.optim == Optim(lr=1e-4, betas=(0.8, 0.9))
    assert load_config(Method).optim == Optim(lr=5e-6, betas=(0.8, 0.9))
