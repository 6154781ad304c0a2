"""The `datagen` command line.

    datagen --help
    datagen teacher "Name three primes." --backend local
    datagen teacher "Hi" --backend openai --base-url http://127.0.0.1:8000/v1 --model NAME

Bad input ends with one line on stderr (`error: ...`) and a non-zero exit (2 for
usage and config errors); `--debug` shows the traceback instead. Only typer,
pydantic and the config load on this path, so `--help` is instant: torch and vLLM
are imported inside the backend that needs them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Optional

import typer

from datagen.engines import SHARD_ENGINES
from datagen.errors import ConfigError, DatagenError
from datagen.finetune.launch import FINETUNE_METHODS, run_finetune

INTERRUPTED = 130  # exit status after Ctrl-C, as a shell reports it

app = typer.Typer(
    name="datagen",
    help="Synthetic instruction data from a teacher model: generate, filter, export, distil.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich's option table cuts long option names at 80 columns.
    rich_markup_mode=None,
)

# Teacher options shared by every command that talks to a teacher. Each maps onto a
# dotted config path and overrides the YAML value when given.
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
BackendOpt = Annotated[Optional[str], typer.Option("--backend", help="local | openai | openai-batch | vllm.")]
ModelOpt = Annotated[
    Optional[str], typer.Option("--model", help="Alias (smollm2-135m), model folder, .gguf or hub id.")
]
BaseUrlOpt = Annotated[
    Optional[str], typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
]
ApiKeyEnvOpt = Annotated[
    Optional[str], typer.Option("--api-key-env", help="Environment variable holding the API key.")
]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (and sampling of seeds).")]
ConcurrencyOpt = Annotated[Optional[int], typer.Option("--concurrency", help="Parallel API requests.")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Seconds per API request.")]
RetriesOpt = Annotated[Optional[int], typer.Option("--max-retries", help="Retries per API request.")]
EngineArgOpt = Annotated[
    Optional[list[str]],
    typer.Option("--engine-arg", help="vLLM engine argument KEY=VALUE (repeatable)."),
]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Request cache folder.")]


def teacher_overrides(**flags: Any) -> dict[str, tuple[str, Any]]:
    """Dotted config paths -> (flag, value) for the shared teacher flags that were given."""
    paths = {
        "backend": ("teacher.backend", "--backend"),
        "model": ("teacher.model", "--model"),
        "base_url": ("teacher.base_url", "--base-url"),
        "api_key_env": ("teacher.api_key_env", "--api-key-env"),
        "temperature": ("teacher.sampling.temperature", "--temperature"),
        "top_p": ("teacher.sampling.top_p", "--top-p"),
        "max_tokens": ("teacher.sampling.max_tokens", "--max-tokens"),
        "seed": ("teacher.sampling.seed", "--seed"),
        "concurrency": ("teacher.max_concurrency", "--concurrency"),
        "timeout": ("teacher.timeout_s", "--timeout"),
        "max_retries": ("teacher.max_retries", "--max-retries"),
        "cache_dir": ("teacher.cache_dir", "--cache-dir"),
        "cache": ("teacher.cache", "--cache"),
    }
    overrides = {}
    for key, value in flags.items():
        if key == "engine_args":
            if value:
                overrides["teacher.engine_args"] = ("--engine-arg", _parse_engine_args(value))
            continue
        path, flag = paths[key]
        overrides[path] = (flag, str(value) if isinstance(value, Path) else value)
    return overrides


def _parse_engine_args(pairs: list[str]) -> dict[str, Any]:
    import yaml

    parsed = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--engine-arg: expected KEY=VALUE, got {pair!r}")
        parsed[key] = yaml.safe_load(raw)
    return parsed


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """datagen: Self-Instruct, Evol-Instruct and Orca data from a teacher model."""


@app.command()
def teacher(
    prompt: Annotated[str, typer.Argument(help="The user message to send.")],
    system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples to draw.")] = 1,
    use_cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Answer from / store in the request cache.")
    ] = False,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = None,
    timeout: TimeoutOpt = None,
    max_retries: RetriesOpt = None,
    engine_args: EngineArgOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Send one prompt to the configured teacher; print the reply, tokens and latency."""
    from datagen.config_file import load_config
    from datagen.teachers import make_teacher

    overrides = teacher_overrides(
        backend=backend, model=model, base_url=base_url, api_key_env=api_key_env,
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        timeout=timeout, max_retries=max_retries, engine_args=engine_args,
        cache_dir=cache_dir, cache="use" if use_cache else "off",
    )
    settings = load_config(config, overrides).teacher
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    started = time.monotonic()
    with make_teacher(settings) as chosen:
        loaded = time.monotonic()
        [replies] = chosen.complete([messages], settings.sampling.model_copy(update={"n": n}))
        done = time.monotonic()
        for index, reply in enumerate(replies):
            if n > 1:
                typer.echo(f"--- sample {index}")
            if not reply.ok:
                raise DatagenError(f"the teacher failed: {reply.error}")
            typer.echo(reply.text)
            typer.echo(
                f"[{chosen.name}] finish={reply.finish_reason} "
                f"prompt_tokens={reply.prompt_tokens} completion_tokens={reply.completion_tokens}"
                + (" (cached)" if reply.cached else ""),
                err=True,
            )
    typer.echo(
        f"[{chosen.name}] latency {done - loaded:.2f} s (load {loaded - started:.2f} s), "
        f"retries {chosen.stats.retries}",
        err=True,
    )


@app.command()
def generate(
    method: Annotated[
        Optional[str], typer.Option("--method", help="self-instruct | alpaca | evol-instruct | orca | preferences | "
                                              "magpie | persona."),
    ] = None,
    seeds: Annotated[Optional[Path], typer.Option("--seeds", help="Seed tasks, any format `datagen filter` reads "
                                                                  "(default: bundled seeds).")] = None,
    input_format: Annotated[Optional[str], typer.Option(
        "--input-format", help="--seeds' format (default: detected; see `datagen filter --help`).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="--seeds' split, for a dataset.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output task JSONL (appended, resumable).")] = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Tasks to produce in total.")] = None,
    instances_per_task: Annotated[
        Optional[int], typer.Option("--instances-per-task", help="Instances wanted per task.")
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling prompts and the teacher.")] = None,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = None,
    timeout: TimeoutOpt = None,
    max_retries: RetriesOpt = None,
    engine_args: EngineArgOpt = None,
    cache_dir: CacheDirOpt = None,
    estimate: Annotated[bool, typer.Option(
        "--estimate", help="Run a small pilot (cached for the real run) and print projected requests, tokens, "
        "wall time and cost for --num; OUT is not written.")] = False,
    pilot: Annotated[int, typer.Option("--pilot", help="Tasks the --estimate pilot makes.")] = 8,
    max_cost: Annotated[Optional[float], typer.Option(
        "--max-cost", help="Stop before a request that could take the run's spend (all its teachers, resumes "
        "included) past this; needs teacher.prices.")] = None,
) -> None:
    """Generate new tasks from seed tasks with a published method."""
    from datagen.config_file import load_config
    from datagen.generate import format_summary, run_generate

    overrides = teacher_overrides(
        backend=backend, model=model, base_url=base_url, api_key_env=api_key_env,
        concurrency=concurrency, timeout=timeout, max_retries=max_retries,
        engine_args=engine_args, cache_dir=cache_dir,
    )
    overrides.update({
        "generate.method": ("--method", method),
        "generate.seeds": ("--seeds", str(seeds) if seeds else None),
        "generate.seeds_format": ("--input-format", input_format),
        "generate.seeds_split": ("--split", split),
        "generate.out": ("--out", str(out) if out else None),
        "generate.num": ("--num", num),
        "generate.instances_per_task": ("--instances-per-task", instances_per_task),
        "generate.seed": ("--seed", seed),
        "teacher.max_cost": ("--max-cost", max_cost),
    })
    settings = load_config(config, overrides)
    if estimate:
        from datagen.estimate import format_estimate, run_estimate

        typer.echo(format_estimate(run_estimate(settings, pilot)))
        return
    summary = run_generate(settings, "datagen " + " ".join(sys.argv[1:]))
    typer.echo(format_summary(summary), err=True)


InputArg = Annotated[Path, typer.Argument(help="Task JSONL to filter (ours or anyone's).")]
KeptOpt = Annotated[Path, typer.Option("--out", "-o", help="Where the kept tasks go.")]
RejectsOpt = Annotated[
    Optional[Path], typer.Option("--rejects", help="Where rejected tasks go (default: OUT.rejects.jsonl).")
]
# `filter`/`dedup --engine`: how the sharded run is laid out
ShardsOpt = Annotated[Optional[int], typer.Option("--tasks", help="--engine: input shards (default: CPUs).")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="--engine: tasks at once (default: all).")]
WorkDirOpt = Annotated[Optional[Path], typer.Option("--work-dir", help="--engine: stage files (default OUT.work).")]
PartitionOpt = Annotated[Optional[str], typer.Option("--partition", help="--engine slurm: partition.")]
SlurmTimeOpt = Annotated[str, typer.Option("--time", help="--engine slurm: time limit per task.")]
# where the passes run (datagen.engines.SHARD_ENGINES)
ENGINE_HELP = (" | ".join(SHARD_ENGINES) + " (local: one process; datatrove: its processes on this machine; "
               "ray joins engine.address, else RAY_ADDRESS, else a local Ray)")
# what the input is (datagen.readers): detected from its content unless named
InputFormatOpt = Annotated[Optional[str], typer.Option(
    "--input-format", help="tasks | alpaca | sharegpt | messages | prompt-completion | preferences | "
    "natural-instructions | hf-export (default: detected from the content).")]
SplitOpt = Annotated[Optional[str], typer.Option(
    "--split", help="Split of a Hugging Face dataset or export folder (default: train, or the only one).")]
SkipInvalidOpt = Annotated[
    bool, typer.Option("--skip-invalid", help="Count malformed lines as rejects instead of stopping.")
]


@app.command("filter")
def filter_command(
    source: InputArg,
    out: KeptOpt,
    rejects: RejectsOpt = None,
    passes: Annotated[
        Optional[str],
        typer.Option("--passes", help="Comma-separated pass names, run in order (default "
                                      "heuristics,exact-dedup,near-dedup); a wrong name lists them all."),
    ] = None,
    eval_files: Annotated[
        Optional[list[Path]], typer.Option("--eval", help="Evaluation file for decontamination (repeatable).")
    ] = None,
    judge_threshold: Annotated[Optional[float], typer.Option("--judge-threshold")] = None,
    overrides_file: Annotated[
        Optional[Path], typer.Option("--overrides", help="Keep/drop marks (JSONL, from `datagen view`) for the "
                                                         "manual pass.")
    ] = None,
    skip_invalid: SkipInvalidOpt = False,
    input_format: InputFormatOpt = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    cache_dir: CacheDirOpt = None,
    engine: Annotated[str, typer.Option(
        "--engine", help=ENGINE_HELP + ": the passes sharded, streaming the input.")] = "local",
    tasks: ShardsOpt = None,
    workers: WorkersOpt = -1,
    work_dir: WorkDirOpt = None,
    partition: PartitionOpt = None,
    slurm_time: SlurmTimeOpt = "24:00:00",
) -> None:
    """Run filter passes over a task JSONL; every rejected task is kept with its reason."""
    overrides = teacher_overrides(backend=backend, model=model, base_url=base_url,
                                  api_key_env=api_key_env, cache_dir=cache_dir)
    overrides.update({
        "filter.passes": ("--passes", [p.strip() for p in passes.split(",") if p.strip()] if passes else None),
        "filter.decontaminate.eval_files": ("--eval", [str(p) for p in eval_files] if eval_files else None),
        "filter.judge.threshold": ("--judge-threshold", judge_threshold),
        "filter.manual.overrides": ("--overrides", str(overrides_file) if overrides_file else None),
        "filter.skip_invalid": ("--skip-invalid", True if skip_invalid else None),
    })
    _filter_on_engine(engine, tasks, source, out, rejects, overrides, config,
                      dict(workers=workers, partition=partition, time=slurm_time), work_dir,
                      input_format=input_format, split=split)


def _filter_on_engine(engine: str, tasks: Optional[int], source: Path, out: Path, rejects: Optional[Path],
                      overrides: dict, config: Optional[Path], engine_options: dict, work_dir: Optional[Path],
                      dedup_only: bool = False, input_format: Optional[str] = None,
                      split: Optional[str] = None) -> None:
    """`filter`/`dedup` (`dedup_only`): in one process (`--engine local`) or sharded (datagen.engines)."""
    from datagen.config_file import load_config
    from datagen.filtering import filter_on_engine
    from datagen.io import rejects_path

    typer.echo(filter_on_engine(load_config(config, overrides), source, out, rejects or rejects_path(out), engine,
                                tasks, engine_options, work_dir, "datagen " + " ".join(sys.argv[1:]),
                                dedup_only=dedup_only, input_format=input_format, split=split), err=True)


@app.command()
def dedup(
    source: InputArg,
    out: KeptOpt,
    rejects: RejectsOpt = None,
    skip_invalid: SkipInvalidOpt = False,
    input_format: InputFormatOpt = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    engine: Annotated[str, typer.Option(
        "--engine", help=ENGINE_HELP + ".")] = "local",
    tasks: ShardsOpt = None,
    workers: WorkersOpt = -1,
    work_dir: WorkDirOpt = None,
    partition: PartitionOpt = None,
    slurm_time: SlurmTimeOpt = "24:00:00",
) -> None:
    """Shortcut for `filter --passes exact-dedup,near-dedup`; --engine runs it sharded on datatrove."""
    overrides = {
        "filter.passes": ("--passes", ["exact-dedup", "near-dedup"]),
        "filter.skip_invalid": ("--skip-invalid", True if skip_invalid else None),
    }
    _filter_on_engine(engine, tasks, source, out, rejects, overrides, config,
                      dict(workers=workers, partition=partition, time=slurm_time), work_dir, dedup_only=True,
                      input_format=input_format, split=split)


@app.command("export")
def export_command(
    source: Annotated[Path, typer.Argument(help="Tasks to export (e.g. kept.jsonl; any format filter reads).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="natural-instructions | alpaca | messages | "
                                                             "prompt-completion | hf | preferences (pairs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (data, README.md card, export.json).")],
    strict: Annotated[bool, typer.Option("--strict", help="natural-instructions: export only the tasks that "
                                                          "pass the upstream validation rules.")] = False,
    prompt_erasure: Annotated[Optional[bool], typer.Option(
        "--prompt-erasure/--no-prompt-erasure", help="Orca 2: train on a generic system message.")] = None,
    language: Annotated[Optional[str], typer.Option("--language", help="ISO 639 name for every task "
                                                                      "(default: detected).")] = None,
    teacher_negatives: Annotated[Optional[bool], typer.Option(
        "--teacher-negatives/--no-teacher-negatives",
        help="natural-instructions: ask the teacher for a wrong answer where no reject gives one.")] = None,
    category: Annotated[Optional[str], typer.Option(
        "--category", help="natural-instructions: one category of the upstream task hierarchy for every "
                           "task (default: by rule, or the teacher's pick).")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", metavar="OWNER/NAME", help="hf: upload the export to this dataset repo on the Hugging "
                                                    "Face Hub (token: HF_TOKEN or `hf auth login`).")] = None,
    private: Annotated[bool, typer.Option("--private", help="--push-to-hub: create the repo private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="--push-to-hub: export, then list what would be "
                                                            "uploaded and upload nothing.")] = False,
    push_only: Annotated[bool, typer.Option(
        "--push-only", help="--push-to-hub: upload the export already in --out (after a failed upload); "
                            "export nothing.")] = False,
    input_format: InputFormatOpt = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Export tasks as Natural-Instructions files, Alpaca / chat / prompt-completion splits or a HF dataset."""
    from datagen.config_file import load_config
    from datagen.export import format_export_summary, hub, run_export

    hub.check_options(fmt, push_to_hub, private=private, dry_run=dry_run, push_only=push_only)
    overrides = teacher_overrides(backend=backend, model=model, base_url=base_url,
                                  api_key_env=api_key_env, cache_dir=cache_dir)
    overrides.update({
        "generate.orca.prompt_erasure": ("--prompt-erasure", prompt_erasure),
        "export.language": ("--language", language),
        "export.teacher_negatives": ("--teacher-negatives", teacher_negatives),
        "export.category": ("--category", category),
    })
    settings = load_config(config, overrides)
    if push_only:
        hub.check_pushable(out, source)
    else:
        summary = run_export(settings, source, fmt, out, strict=strict,
                             command_line="datagen " + " ".join(sys.argv[1:]), input_format=input_format, split=split)
        typer.echo(format_export_summary(summary), err=True)
        if strict and summary["tasks_exported"] == 0:
            raise DatagenError(f"--strict: none of the {summary['tasks']} tasks passes; see the reasons above")
    if push_to_hub:
        hub.run_push(out, push_to_hub, private=private, dry_run=dry_run, announce=typer.echo)


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(help="Chat/prompt-completion/Alpaca/task JSONL, or an export folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (adapter/, merged/, logs).")],
    base: Annotated[
        Optional[str], typer.Option("--base", help="Student: alias, model folder, .gguf or hub id.")
    ] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", help=" | ".join(FINETUNE_METHODS) + ": LoRA or QLoRA SFT, or DPO on PAIRS (the dpo: section, "
        "LoRA or QLoRA).")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help="dpo: strength of the reference penalty.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    max_steps: Annotated[
        Optional[int], typer.Option("--max-steps", help="Optimiser steps (overrides --epochs).")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", "--lr")] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Tokens (default: from the data).")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing")] = None,
    merge: Annotated[Optional[bool], typer.Option("--merge/--no-merge", help="Also save a merged model.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    distributed: Annotated[
        Optional[str], typer.Option("--distributed", help="ddp | fsdp, when several processes train.")
    ] = None,
    nproc: Annotated[
        Optional[int], typer.Option("--nproc", help="Processes on this node (torchrun; a GPU each on CUDA).")
    ] = None,
    nnodes: Annotated[Optional[str], typer.Option("--nnodes", help="Nodes (torchrun), e.g. 2 or 1:4.")] = None,
    node_rank: Annotated[Optional[int], typer.Option("--node-rank", help="This node's rank (static).")] = None,
    master_addr: Annotated[Optional[str], typer.Option("--master-addr", help="Rank 0's node (static).")] = None,
    master_port: Annotated[Optional[int], typer.Option("--master-port")] = None,
    rdzv_endpoint: Annotated[
        Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of a c10d rendezvous (elastic).")
    ] = None,
    input_format: InputFormatOpt = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
) -> None:
    """LoRA / QLoRA SFT of a student on chat data, or DPO on preference pairs; rerun the same command to resume."""
    flags = {"base": (base, "--base"), "method": (method, "--method"), "beta": (beta, "--beta"),
             "epochs": (epochs, "--epochs"), "max_steps": (max_steps, "--max-steps"),
             "batch_size": (batch_size, "--batch-size"), "grad_accum": (grad_accum, "--grad-accum"),
             "learning_rate": (learning_rate, "--learning-rate"), "r": (lora_r, "--lora-r"),
             "alpha": (lora_alpha, "--lora-alpha"), "max_length": (max_length, "--max-length"),
             "packing": (packing, "--packing"), "merge": (merge, "--merge"), "seed": (seed, "--seed"),
             "distributed": (distributed, "--distributed"), "input_format": (input_format, "--input-format"),
             "split": (split, "--split")}
    launch = {"nnodes": nnodes, "node_rank": node_rank, "master_addr": master_addr, "master_port": master_port,
              "rdzv_endpoint": rdzv_endpoint}
    line = run_finetune(data, out, method=method, flags=flags, launch=launch, nproc=nproc, config=config)
    if line:
        typer.echo(line, err=True)


@app.command("eval")
def eval_command(
    tuned: Annotated[str, typer.Option("--tuned", help="The finetune output folder or a merged model folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where report.json and report.md go.")],
    data: Annotated[Optional[Path], typer.Argument(
        help="Held-out data: an export folder (its test.jsonl) or a file; optional with --benchmark.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="The base student (default: finetune.base).")] = None,
    judge: Annotated[Optional[bool], typer.Option("--judge/--no-judge", help="Teacher-judged win rate.")] = None,
    max_examples: Annotated[Optional[int], typer.Option("--max-examples")] = None,
    benchmark: Annotated[Optional[list[str]], typer.Option(
        "--benchmark", help="External benchmark (repeatable): ni | ni-2pos (NAME:PATH for an NI checkout or task "
                            "folder; default the shipped sample) | ifeval | judged:FILE | lm-eval:TASKS | a PATH. "
                            "Replaces eval.benchmarks.")] = None,
    lm_eval: Annotated[Optional[list[str]], typer.Option(
        "--lm-eval", help="lm-evaluation-harness tasks, comma-separated (repeatable); as --benchmark lm-eval:TASKS.")
    ] = None,
    lm_eval_include: Annotated[Optional[list[Path]], typer.Option(
        "--lm-eval-include", help="Folder of your own lm-eval task YAMLs (repeatable).")] = None,
    input_format: InputFormatOpt = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
) -> None:
    """Compare the base and the tuned student on held-out tasks (loss, ROUGE-L, win rate) and benchmarks."""
    from datagen.config_file import load_config
    from datagen.finetune.evaluate import evaluate, format_summary

    overrides = teacher_overrides(backend=backend, model=model, base_url=base_url, api_key_env=api_key_env)
    specs = [*(benchmark or []), *(f"lm-eval:{tasks}" for tasks in lm_eval or [])]
    overrides.update({"finetune.base": ("--base", base), "eval.judge": ("--judge", judge),
                      "eval.max_examples": ("--max-examples", max_examples),
                      "eval.benchmarks": ("--benchmark", specs or None),
                      "eval.benchmark.lm_eval_include": (
                          "--lm-eval-include", [str(p) for p in lm_eval_include] if lm_eval_include else None)})
    settings = load_config(config, overrides)
    from datagen.finetune.dpo_eval import evaluate_dpo, format_dpo_eval, is_dpo_output

    if is_dpo_output(tuned):  # held-out pairs: reward accuracy, margin, win rate over the SFT student
        if data is None:
            raise ConfigError("eval: a DPO student is scored on held-out preference pairs; give their folder")
        report = evaluate_dpo(settings.eval, data, tuned, out, teacher_config=settings.teacher)
        typer.echo(format_dpo_eval(report) + f"\nreport: {out / 'report.md'}", err=True)
        return
    report = evaluate(settings.eval, data, settings.finetune.base, tuned, out, teacher_config=settings.teacher,
                      input_format=input_format, split=split)
    typer.echo(format_summary(report) + f"\nreport: {out / 'report.md'}", err=True)


@app.command()
def distill(
    config: Annotated[Path, typer.Argument(help="YAML config: teacher, generate, filter, export, finetune, eval.")],
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Where every stage writes.")] = None,
    start_from: Annotated[Optional[str], typer.Option("--from", help="Rerun from this stage on.")] = None,
) -> None:
    """generate → filter → export → finetune → eval from one config; rerun to resume."""
    from datagen.config_file import load_config
    from datagen.distill import run_distill
    from datagen.finetune.evaluate import format_summary

    settings = load_config(config, {"distill.workdir": ("--workdir", str(workdir) if workdir else None)})
    result = run_distill(settings, "datagen " + " ".join(sys.argv[1:]), start_from=start_from,
                         say=lambda text: typer.echo(text, err=True))
    typer.echo(f"\ndistilled into {result['workdir']}/student; before -> after:\n"
               + format_summary(result["report"]), err=True)
    if "dpo_report" in result:
        from datagen.finetune.dpo_eval import format_dpo_eval

        typer.echo(f"\nDPO student {result['workdir']}/dpo-student:\n" + format_dpo_eval(result["dpo_report"]),
                   err=True)


@app.command()
def view(
    path: Annotated[Path, typer.Argument(help="Run folder (e.g. distill.workdir) or task JSONL to look at.")],
    port: Annotated[int, typer.Option("--port", help="Port to serve on (0 picks a free one).")] = 8765,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but 127.0.0.1 lets other "
                                                     "machines read the data.")] = "127.0.0.1",
    input_format: InputFormatOpt = None,
    split: SplitOpt = None,
) -> None:
    """Browse, trace and curate a run in a local web page (keep/drop marks go to an overrides JSONL)."""
    from datagen.view import serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: serving on {host}, not 127.0.0.1: anyone who can reach this address can read "
                   f"the data under {path} and write marks (requests must name this host)", err=True)
    serve(path, host=host, port=port, announce=lambda line: typer.echo(line, err=True), input_format=input_format,
          split=split)


def _click_exceptions() -> ModuleType:
    """The exceptions module of the click that typer parses with: its own vendored copy
    (typer >= 0.26, which no longer depends on click) or click itself (older typer)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _usage_error_line(error: Exception) -> str:
    """A parse error (unknown option, bad value) as one line that says where help is."""
    context = getattr(error, "ctx", None)
    command = context.command_path if context is not None else "datagen"
    return f"error: {error.format_message().rstrip('.')} (see '{command} --help')"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `datagen` console script."""
    args = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app)
    click_errors = _click_exceptions()
    try:
        status = command.main(args=args, prog_name="datagen", standalone_mode=False)
    except typer.Exit as stop:  # click's Exit under older typer, typer's own under newer
        sys.exit(stop.exit_code)
    except click_errors.ClickException as error:
        if getattr(click_errors, "NoArgsIsHelpError", None) and isinstance(error, click_errors.NoArgsIsHelpError):
            error.show()  # its message is the help text
        else:
            typer.echo(_usage_error_line(error), err=True)
        sys.exit(error.exit_code)
    except typer.Abort as stop:
        # Older click turns Ctrl-C into Abort; it gets the same line as below.
        interrupted = isinstance(stop.__context__, KeyboardInterrupt)
        typer.echo("error: interrupted; rerun the same command to resume" if interrupted else "error: aborted",
                   err=True)
        sys.exit(INTERRUPTED)
    except DatagenError as error:
        if "--debug" in args:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        status = INTERRUPTED
    # Without standalone mode an Exit raised inside comes back as its code; newer typer
    # turns Ctrl-C into Exit(130) that way too.
    if status == INTERRUPTED:
        typer.echo("error: interrupted; rerun the same command to resume", err=True)
    if isinstance(status, int) and status:
        sys.exit(status)


if __name__ == "__main__":
    main()
