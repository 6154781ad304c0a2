"""Config: YAML into strict pydantic models, CLI overrides, one-line errors."""

from __future__ import annotations

import pytest

from datagen.config_file import load_config
from datagen.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    assert load_config().teacher.backend == "local"
    config = load_config(write(tmp_path, "teacher:\n  backend: openai\n"
                                         "  sampling: {temperature: 0.2, stop: [\"\\n\\n\"]}\n"))
    assert config.teacher.backend == "openai"
    assert config.teacher.sampling.temperature == 0.2
    assert config.teacher.sampling.stop == ("\n\n",)


def test_cli_overrides_win_and_unset_flags_do_not(tmp_path):
    path = write(tmp_path, "teacher:\n  backend: openai\n  model: a\n")
    config = load_config(path, {"teacher.model": ("--model", "b"), "teacher.backend": ("--backend", None)})
    assert (config.teacher.backend, config.teacher.model) == ("openai", "b")


def test_unknown_key_names_file_and_field(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "teacher:\n  temprature: 0.2\n"))
    assert str(caught.value) == f"{tmp_path / 'config.yaml'}: teacher.temprature: unknown key"
    assert caught.value.exit_code == 2


def test_bad_value_from_a_flag_names_the_flag():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"teacher.backend": ("--backend", "ollama")})
    assert str(caught.value).startswith("--backend: Input should be 'local', 'openai', 'openai-batch' or 'vllm'")


def test_yaml_syntax_error_has_a_line(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.yaml:\d+: expected"):
        load_config(write(tmp_path, "teacher:\n  backend: [unclosed\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
