"""Configuration: YAML files validated into pydantic models, with CLI flags on top.

This module holds the shared sections (sampling, teacher); `datagen.settings.Config`
assembles the whole file from them and the stage sections. Every model forbids unknown keys, so a typo in a config is an error, not a silent
default. `load_config(path, overrides)` applies dotted-path overrides from CLI flags
(`{"teacher.backend": "openai"}`) before validation, so a bad flag value is reported
against the flag that set it:

    error: config.yaml: teacher.backend: Input should be 'local', 'openai' or 'vllm'
    error: --temperature: Input should be less than or equal to 2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class PriceTable(Strict):
    """Prices in currency units per million tokens; turns usage into cost."""

    input_per_million: float = Field(ge=0.0)
    output_per_million: float = Field(ge=0.0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / 1_000_000


class TeacherConfig(Strict):
    """Which teacher answers, how it is called, and where its replies are cached."""

    backend: Literal["local", "openai", "vllm"] = "local"
    model: str = DEFAULT_MODEL
    sampling: SamplingParams = SamplingParams()

    # local (transformers)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(16, ge=1)

    # openai (any OpenAI-compatible server)
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(32, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    prices: PriceTable | None = None

    # vllm (offline engine); e.g. {"tensor_parallel_size": 2, "max_model_len": 4096}
    engine_args: dict[str, Any] = Field(default_factory=dict)

    # request cache: "use" reads and writes, "off" bypasses, "only" replays offline
    cache: Literal["use", "off", "only"] = "use"
    cache_dir: str | None = None


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


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, tuple[str, Any]] | None = None,
    model: type[Strict] | None = None,
) -> Any:
    """Load `path` (or defaults when None), apply CLI `overrides`, validate into `model`.

    `model` defaults to the whole-file `datagen.settings.Config`.
    """
    if model is None:
        from datagen.settings import Config

        model = Config
    data = read_yaml(path) if path else {}
    return validate_config(model, data, str(path) if path else "config", overrides)
