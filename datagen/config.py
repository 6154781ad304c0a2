"""Config building blocks: a strict base model, sampling parameters, YAML reading, CLI overrides.

The building blocks every config section uses: `Strict` (a pydantic model that forbids
unknown keys, so a typo in a config is an error, not a silent default), `SamplingParams`,
YAML reading and `validate_config`, which applies dotted-path overrides from CLI flags
(`{"teacher.backend": ("--backend", "openai")}`) before validation, so a bad flag value
is reported against the flag that set it:

    error: config.yaml: teacher.backend: Input should be 'local', 'openai', 'openai-batch' or 'vllm'
    error: --temperature: Input should be less than or equal to 2

Each stage module owns its own section (`datagen.teachers.TeacherConfig`,
`datagen.generate.GenerateConfig`, ...); `datagen.config_file` assembles the whole file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from datagen.errors import ConfigError, InputError
from datagen.io import read_text

DEFAULT_MODEL = "smollm2-135m"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParams(Strict):
    """Sampling for one teacher call. `n` samples per prompt, each cached on its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = Field(1, ge=1)


def with_sections(name: str, base: type[Strict], sections: dict[str, type[BaseModel]], doc: str) -> type[Strict]:
    """`base` plus one field per `sections` entry (field name -> settings model, defaulted).

    Stage sections whose parts come from a registry (generation methods, filter passes)
    are built this way, so registering a part is what adds its settings to the config.
    """
    fields: dict[str, Any] = {key: (model, Field(default_factory=model)) for key, model in sections.items()}
    return create_model(name, __base__=base, __doc__=doc, **fields)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = tree.get(key)
        if not isinstance(child, dict):
            child = tree[key] = {}
        tree = child
    tree[leaf] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; a missing file or a syntax error is a ConfigError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: cannot read config ({'a folder' if path.is_dir() else 'no such file'})")
    try:
        text = read_text(path, "a YAML config file")
    except InputError as error:
        raise ConfigError(str(error)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def validate_config(
    model: type[Strict],
    data: dict[str, Any],
    source: str,
    overrides: dict[str, tuple[str, Any]] | None = None,
) -> Any:
    """Validate `data` (plus `overrides`: dotted path -> (flag name, value)) into `model`."""
    overrides = {path: pair for path, pair in (overrides or {}).items() if pair[1] is not None}
    for dotted, (_flag, value) in overrides.items():
        _set_dotted(data, dotted, value)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        flag = next((f for path, (f, _v) in overrides.items() if path == location), None)
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        if flag:
            raise ConfigError(f"{flag}: {message}") from None
        raise ConfigError(f"{source}: {location}: {message}") from None
