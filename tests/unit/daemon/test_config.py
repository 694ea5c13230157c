from pathlib import Path

import pytest

from growclip_daemon.config import ConfigError, DaemonConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["demo.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, DaemonConfig)


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        None, ["train.lr=0.01", "model.image.depth=3", "kafka.embedded=true", "growth.plan=[deepen:text+1]"]
    )
    assert cfg.train.lr == 0.01
    assert cfg.model.image.depth == 3
    assert cfg.kafka.embedded is True
    assert cfg.growth.plan == ("deepen:text+1",)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(path)


def test_unknown_nested_model_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"model\.image\.widht"):
        load_config(None, ["model.image.widht=64"])


def test_bad_value_names_field_and_reason() -> None:
    with pytest.raises(ConfigError, match=r"train.*batch_size must be >= 2"):
        load_config(None, ["train.batch_size=1"])
    with pytest.raises(ConfigError, match=r"serve\.port"):
        load_config(None, ["serve.port=70000"])
    with pytest.raises(ConfigError, match=r"growth.*bad:op"):
        load_config(None, ["growth.plan=[bad:op]"])


def test_malformed_files_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        parse_override("no-equals-sign")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["log_level=INFO", "log_level.x=1"])
