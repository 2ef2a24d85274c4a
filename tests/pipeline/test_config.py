from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config


def test_defaults_without_a_file() -> None:
    config = load_config(None, environ={})
    assert config.model.backbone == "efficientnet_lite0" and config.bank.kind == "bounded_coreset"


def test_file_then_environment_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[scoring]\nshift_pixels = 2\n[model]\nimage_size = 320\n")
    config = load_config(tmp_path / "c.toml", environ={"LINEINSPECT__SCORING__SHIFT_PIXELS": "4",
                                                       "REDIS_URL": "redis://x:1/0"})  # fmt: skip
    assert config.scoring.shift_pixels == 4 and config.model.image_size == 320
    assert config.redis.url == "redis://x:1/0"


def test_misspelled_key_and_bad_value_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[bank]\ncompresion_ratio = 2\n")
    with pytest.raises(ConfigError, match=r"bank\.compresion_ratio"):
        load_config(tmp_path / "c.toml", environ={})
    with pytest.raises(ConfigError, match=r"model\.aggregation_kernel"):
        load_config(None, environ={"LINEINSPECT__MODEL__AGGREGATION_KERNEL": "4"})
    with pytest.raises(ConfigError, match=r"npad\.averaging_kernel must be odd"):
        load_config(None, environ={"LINEINSPECT__NPAD__AVERAGING_KERNEL": "2"})
    with pytest.raises(ConfigError, match=r"scoring\.normalisation_fraction"):
        load_config(None, environ={"LINEINSPECT__SCORING__NORMALISATION_FRACTION": "0.7"})
    with pytest.raises(ConfigError, match="softmin"):
        load_config(None, environ={"LINEINSPECT__SCORING__IMAGE_SCORE": "softmin"})


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", environ={})
