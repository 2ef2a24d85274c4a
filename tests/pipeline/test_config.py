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


PADIM_MEMBER = {"method": "padim", "model": {"aggregation_kernel": 1}, "scoring": {"image_score": "max"}}


def test_fusion_member_config_is_the_base_with_its_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        "[model]\nimage_size = 128\n[scoring]\nshift_pixels = 2\ntop_k = 5\n"
        '[[fusion.members]]\nmethod = "padim"\nmodel = { aggregation_kernel = 1 }\nscoring = { image_score = "max" }\n'
    )
    config = load_config(tmp_path / "c.toml", environ={})
    member = config.member_config(config.fusion_members[0])
    assert (member.model.method, member.model.aggregation_kernel, member.model.image_size) == ("padim", 1, 128)
    assert (member.scoring.image_score, member.scoring.shift_pixels, member.scoring.top_k) == ("max", 2, 5)
    assert member.fusion_members == () and config.model.method == "patchcore" and config.model.aggregation_kernel == 3
    coarse = config.member_config(config.fusion_members[0].model_copy(update={"model": {"image_size": 96}}))
    assert coarse.model.image_size == 96 and config.model.image_size == 128  # a member may see the frames smaller
    assert load_config(tmp_path / "c.toml", environ={"LINEINSPECT__FUSION__MEMBERS": "[]"}).fusion_members == ()


def test_recommended_companions_apply_only_where_they_were_chosen() -> None:
    from pipeline.config import config_from_mapping

    padim, coarse_padim = config_from_mapping({}).fusion_members
    layers = ["blocks.2", "blocks.3", "blocks.4"]
    assert padim.method == "padim" and padim.model == {"aggregation_kernel": 3, "layers": layers}
    # the same PaDiM again on the frames at 5/7 of the input size
    assert coarse_padim.method == "padim" and coarse_padim.model == {"aggregation_kernel": 3, "layers": layers,
                                                                     "image_size": 160}  # fmt: skip
    assert coarse_padim.scoring == padim.scoring == {"image_score": "max"}
    sizes = {size: config_from_mapping({"model": {"image_size": size}}).fusion_members[-1].model.get("image_size")
             for size in (64, 96, 256, 320)}  # fmt: skip
    assert sizes == {64: None, 96: 64, 256: 176, 320: 224}  # no coarse pair below 64 px
    lite2 = config_from_mapping({"model": {"backbone": "efficientnet_lite2"}}).fusion_members[0]
    assert lite2.model == {"aggregation_kernel": 3, "layers": layers}  # the same blocks in every EfficientNet-Lite
    for model in ({"backbone": "resnet18"}, {"layers": ["blocks.1", "blocks.4"]}):  # only the Lites, own layers unset
        assert config_from_mapping({"model": model}).fusion_members[0].model == {"aggregation_kernel": 3}
    assert config_from_mapping({"model": {"method": "npad"}}).fusion_members == ()
    assert config_from_mapping({"scoring": {"normalise_positions": False}}).fusion_members == ()
    assert config_from_mapping({"fusion": {"members": []}}).fusion_members == ()


@pytest.mark.parametrize(
    ("fusion", "scoring", "message"),
    [
        ({"members": [PADIM_MEMBER | {"model": {"resize": "pad"}}]}, {}, r"cannot override model\.resize"),
        ({"members": [PADIM_MEMBER | {"scoring": {"shift_pixels": 2}}]}, {}, r"cannot override scoring\.shift_pixels"),
        ({"members": [PADIM_MEMBER | {"model": {"intensity": "raw"}}]}, {}, r"cannot override model\.intensity"),
        ({"members": [PADIM_MEMBER | {"scoring": {"map_baseline": "none"}}]}, {}, r"cannot override scoring\.map_b"),
        ({"members": [PADIM_MEMBER | {"model": {"aggregation_kernel": 2}}]}, {}, r"'padim': model\.aggregation_kernel"),
        ({"members": [PADIM_MEMBER | {"scoring": {"top_kk": 3}}]}, {}, r"'padim': scoring\.top_kk: Extra inputs"),
        ({"members": [{"method": "padimm"}]}, {}, r"fusion\.members\.0\.method"),
        ({"members": [PADIM_MEMBER]}, {"normalise_positions": False}, r"needs scoring\.normalise_positions = true"),
    ],
)
def test_bad_fusion_members_are_named(fusion: dict, scoring: dict, message: str) -> None:
    from pipeline.config import config_from_mapping

    with pytest.raises(ConfigError, match=message):
        config_from_mapping({"fusion": fusion, "scoring": scoring})


def test_a_redis_url_without_a_scheme_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"redis\.url: 'localhost:6379' is not a Redis URL.*REDIS_URL"):
        load_config(None, environ={"REDIS_URL": "localhost:6379"})
    for url in ("redis://h:1/0", "rediss://h:1/0", "unix:///run/redis.sock"):
        assert load_config(None, environ={"REDIS_URL": url}).redis.url == url


def test_an_error_names_the_environment_once_with_its_variables() -> None:
    environ = {"REDIS_URL": "localhost:6379", "LINEINSPECT__WORKER__MAX_BATCH": "4"}
    environ["LINEINSPECT__WORKER__DECODE_THREADS"] = "4"
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ=environ)
    message = str(caught.value)
    assert message.count("environment") == 2  # the source, and the redis.url hint
    variables = "LINEINSPECT__WORKER__DECODE_THREADS, LINEINSPECT__WORKER__MAX_BATCH, REDIS_URL"
    assert f"invalid configuration in defaults + environment ({variables}): redis.url" in message


def test_environment_overrides_of_text_settings_are_taken_as_written() -> None:
    """Overrides are JSON for numbers, booleans and lists; a line id or prefix that looks like a number stays text."""
    config = load_config(environ={"LINEINSPECT__WORKER__LINE_ID": "42", "LINEINSPECT__STREAMS__PREFIX": "2024",
                                  "LINEINSPECT__MODEL__WEIGHTS_PATH": "123", "LINEINSPECT__SCORING__SHIFT_PIXELS": "3",
                                  "LINEINSPECT__SCORING__SHIFT_ONLY_FAILING": "false",
                                  "LINEINSPECT__MODEL__LAYERS": '["blocks.2", "blocks.3"]'})  # fmt: skip
    assert (config.worker.line_id, config.streams.prefix, config.model.weights_path) == ("42", "2024", Path("123"))
    assert (config.scoring.shift_pixels, config.scoring.shift_only_failing) == (3, False)
    assert config.model.layers == ("blocks.2", "blocks.3")
    config = load_config(environ={"LINEINSPECT__WORKER__LINE_ID": '"007"', "LINEINSPECT__MODEL__WEIGHTS_PATH": "null"})
    assert (config.worker.line_id, config.model.weights_path) == ("007", None)


def test_a_boolean_for_a_number_is_refused_not_read_as_one() -> None:
    with pytest.raises(ConfigError, match=r"scoring\.shift_pixels: Input should be a valid integer"):
        load_config(environ={"LINEINSPECT__SCORING__SHIFT_PIXELS": "true"})


@pytest.mark.parametrize("sigma", ["inf", "1e6"])
def test_smoothing_beyond_any_image_is_refused(sigma: str) -> None:
    with pytest.raises(ConfigError, match=r"scoring\.smoothing_sigma: Input should be less than or equal to 64"):
        load_config(environ={"LINEINSPECT__SCORING__SMOOTHING_SIGMA": sigma})


def test_config_paths_that_are_not_toml_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"config file {tmp_path} cannot be read"):
        load_config(tmp_path)
    binary = tmp_path / "config.toml"
    binary.write_bytes(b"\xd0\xff\x00\x81")
    with pytest.raises(ConfigError, match=f"config file {binary} is not valid TOML"):
        load_config(binary)


@pytest.mark.parametrize(("line_id", "message"), [("l" * 257, "is 257 characters"), ("line-1\r", "control character")])
def test_a_line_id_its_own_frames_could_not_carry_is_refused(line_id: str, message: str) -> None:
    # every frame carries worker.line_id and the wire refuses such ids: the line's frames were all dead-lettered
    with pytest.raises(ConfigError, match=rf"worker\.line_id: .*{message}"):
        load_config(None, environ={"LINEINSPECT__WORKER__LINE_ID": line_id})
    assert load_config(None, environ={"LINEINSPECT__WORKER__LINE_ID": "hall 2: line-7"}).worker.line_id
    # "health" names the heartbeats' keys (P:health:<role>:<name>): its model key broke `lineinspect check`
    with pytest.raises(ConfigError, match=r"worker\.line_id: .*'health' is reserved"):
        load_config(None, environ={"LINEINSPECT__WORKER__LINE_ID": "health"})
