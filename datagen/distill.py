"""`datagen distill CONFIG`: generate → filter → export → finetune → eval from one YAML file.

    datagen distill examples/distill_self_instruct.yaml

Everything lands in `distill.workdir`:

    raw.jsonl (+ .rejects.jsonl, .summary.json)   generate
    kept.jsonl (+ .rejects.jsonl, .stats.json)    filter
    dataset/  train/validation/test.jsonl + card  export (chat messages, split by task)
    export-<format>/                               export, each extra format in distill.formats
    student/  adapter/, merged/, train_log.jsonl   finetune (on dataset/train.jsonl)
    eval/     report.json, report.md               eval (base vs tuned on dataset/test.jsonl, and on the
                                                   external benchmarks of eval.benchmarks: the closing
                                                   report lists them)
    distill.json                                   which stages are done, and with what settings

With `distill.dpo: true` the Zephyr recipe goes on past SFT (the stages in
`PREFERENCE_STAGES`):

    pairs.jsonl (+ .rejects.jsonl, .summary.json) preferences (`generate.preferences` on kept.jsonl;
    preferences/  train/validation/test.jsonl     a responder whose model is `student` is the SFT
                                                  student; pairs split by task as dataset/ is)
    dpo-student/  adapter/, merged/, train_log    dpo (the `dpo:` section, from the SFT student,
                                                  on preferences/train.jsonl)
    dpo-eval/     report.json, report.md          dpo-eval (reward accuracy and margin on
                                                  preferences/test.jsonl; judged win rate over
                                                  the SFT student with eval.judge)

Resumable stage by stage: a stage whose settings (and whose upstream stages) are
unchanged since it finished is skipped. A stage killed midway resumes its own way
(generation from its output file and the request cache, training from its last
checkpoint); a stage whose settings changed reruns, and so does every stage after it.
Generation keeps appending to `raw.jsonl`, so raising `generate.num` adds tasks; use a
new workdir to start from nothing. Preference pairs are made again when their stage reruns
(the student answering may have changed; the teacher's replies come from the cache).
`--from STAGE` reruns from that stage on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from datagen.config import Strict
from datagen.engines.config import EngineConfig
from datagen.errors import ConfigError, InputError
from datagen.finetune.benchmarks import BenchmarkOptions, needs_judge
from datagen.finetune.config import SFT_ONLY_FIELDS
from datagen.io import atomic_write_json, progress_path, rejects_path, summary_path

STAGES = ("generate", "filter", "export", "finetune", "eval")
PREFERENCE_STAGES = ("preferences", "dpo", "dpo-eval")  # with distill.dpo
ALL_STAGES = STAGES + PREFERENCE_STAGES
# the stage whose output each stage reads: its fingerprint is chained onto that one's
UPSTREAM = {"filter": "generate", "export": "filter", "finetune": "export", "eval": "finetune",
            "preferences": "finetune", "dpo": "preferences", "dpo-eval": "dpo"}
STUDENT_RESPONDER = "student"  # a preferences responder with this model answers with the SFT student
STATE_FILE = "distill.json"
EVAL_ADDED_DEFAULTS = {"benchmarks": [], "benchmark": BenchmarkOptions().model_dump(mode="json"), "engine": "auto"}
TRAINING_FORMAT = "messages"


class DistillConfig(Strict):
    workdir: str = "out/distill"
    # export formats written beside the chat messages the student trains on
    formats: list[Literal["natural-instructions", "alpaca", "messages", "prompt-completion", "hf"]] = Field(
        default_factory=list
    )
    # go on past SFT: preference pairs on kept.jsonl, DPO from the SFT student, its eval
    dpo: bool = False
    pairs: int = Field(64, ge=1)  # preference pairs to make


class Paths:
    """Where each stage reads and writes inside the workdir."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.raw = self.workdir / "raw.jsonl"
        self.kept = self.workdir / "kept.jsonl"
        self.kept_rejects = self.workdir / "kept.rejects.jsonl"
        self.dataset = self.workdir / "dataset"
        self.student = self.workdir / "student"
        self.eval = self.workdir / "eval"
        self.state = self.workdir / STATE_FILE
        self.pairs = self.workdir / "pairs.jsonl"
        self.preferences = self.workdir / "preferences"
        self.dpo_student = self.workdir / "dpo-student"
        self.dpo_eval = self.workdir / "dpo-eval"

    def export_dir(self, fmt: str) -> Path:
        return self.workdir / f"export-{fmt}"


def stage_settings(config, stage: str) -> dict[str, Any]:
    """The settings that shape one stage's output (its fingerprint is made of these)."""
    dump = config.model_dump(mode="json")
    teacher = {k: v for k, v in dump["teacher"].items() if k not in ("cache", "cache_dir", "max_concurrency")}
    if stage == "generate":
        # the preferences section is the preferences stage's (leaving it out also keeps the
        # fingerprints of workdirs made before it existed)
        return {"teacher": teacher,
                "generate": {k: v for k, v in dump["generate"].items() if k not in ("out", "preferences")}}
    if stage == "filter":
        uses_teacher = "judge" in config.filter.passes
        return {"filter": dump["filter"], "teacher": teacher if uses_teacher else None}
    if stage == "export":
        return {"export": dump["export"], "formats": dump["distill"]["formats"],
                "orca": {k: dump["generate"]["orca"][k] for k in ("prompt_erasure", "generic_system")}}
    # generic_system acts on task JSONL only; distill trains and evaluates on the export, which
    # applied the export's (`orca` above)
    if stage == "finetune":
        return {"finetune": {k: v for k, v in dump["finetune"].items()
                             if k not in ("save_every", "keep_checkpoints", "generic_system")}}
    if stage == "preferences":
        return {"teacher": teacher, "preferences": dump["generate"]["preferences"], "pairs": dump["distill"]["pairs"],
                "seed": dump["generate"]["seed"], "export": dump["export"]}
    if stage == "dpo":
        # SFT's data options were in the dpo section (always at these values) before it lost them:
        # kept in, workdirs made before still skip a finished dpo stage
        settings = {**SFT_ONLY_FIELDS, **dump["dpo"]}
        return {"dpo": {k: v for k, v in settings.items() if k not in ("save_every", "keep_checkpoints", "base")}}
    # the benchmark fields count only when set: workdirs made before they existed still skip a finished eval
    defaults = EVAL_ADDED_DEFAULTS
    settings = {k: v for k, v in dump["eval"].items()
                if k != "generic_system" and not (k in defaults and v == defaults[k])}
    return {"eval": settings, "teacher": teacher if config.eval.judge or needs_judge(config.eval.benchmarks) else None}


def fingerprints(config) -> dict[str, str]:
    """Each stage's fingerprint, chained onto its upstream stage's: a change upstream changes
    every stage after it."""
    chained: dict[str, str] = {}
    for stage in ALL_STAGES:
        previous = chained[UPSTREAM[stage]] if stage in UPSTREAM else ""
        payload = previous + json.dumps(stage_settings(config, stage), sort_keys=True)
        chained[stage] = hashlib.sha256(payload.encode()).hexdigest()
    return chained


def read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path}: unreadable stage record; delete it to rerun every stage") from None


def run_distill(
    config,
    command_line: str,
    *,
    start_from: str | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the stages that are not done; return {stage: outcome} plus the eval report."""
    from datagen.generate import format_summary as generate_summary
    from datagen.generate import run_generate

    if start_from is not None and start_from not in ALL_STAGES:
        raise ConfigError(f"--from: expected one of {', '.join(ALL_STAGES)}, got {start_from!r}")
    paths = Paths(config.distill.workdir)
    paths.workdir.mkdir(parents=True, exist_ok=True)
    state = read_state(paths.state)
    wanted = fingerprints(config)
    forced = ALL_STAGES[ALL_STAGES.index(start_from):] if start_from else ()
    stages = ALL_STAGES if config.distill.dpo else STAGES

    def run_generate_stage() -> None:
        generate_config = config.model_copy(
            update={"generate": config.generate.model_copy(update={"out": str(paths.raw)})}
        )
        say(generate_summary(run_generate(generate_config, command_line)))

    def run_filter_stage() -> None:
        from datagen.filtering import format_stats, run_filter

        say(format_stats(run_filter(config, paths.raw, paths.kept, paths.kept_rejects, command_line)))

    def run_export_stage() -> None:
        from datagen.export import format_export_summary, run_export

        say(format_export_summary(run_export(config, paths.kept, TRAINING_FORMAT, paths.dataset,
                                             command_line=command_line)))
        for fmt in config.distill.formats:
            say(format_export_summary(run_export(config, paths.kept, fmt, paths.export_dir(fmt),
                                                 command_line=command_line)))

    def run_finetune_stage() -> None:
        from datagen.finetune.sft import train

        summary = train(config.finetune, paths.dataset / "train.jsonl", paths.student)
        say(f"finetune: {summary['step']} steps, final loss {summary['final_loss']}, "
            f"{summary['tokens_per_s']} tokens/s, peak {summary['peak_memory_mib']} MiB")

    def run_eval_stage() -> None:
        from datagen.finetune.evaluate import evaluate

        evaluate(config.eval, paths.dataset / "test.jsonl", config.finetune.base, str(paths.student),
                 paths.eval, teacher_config=config.teacher)

    def run_preferences_stage() -> None:
        from datagen.export import format_export_summary, run_export

        # the student's replies are cached under this SFT run's fingerprint: its folder keeps
        # its name when it is retrained, and the cache must not answer for the old weights
        student = {"model": str(paths.student / "merged"),
                   "cache_dir": str(paths.workdir / "student-cache" / wanted["finetune"][:16])}
        responders = [
            r.model_copy(update={"teacher": r.teacher.model_copy(update=student)})
            if r.teacher is not None and r.teacher.model == STUDENT_RESPONDER else r
            for r in config.generate.preferences.responders
        ]
        preferences = config.generate.preferences.model_copy(update={"responders": responders})
        generate = config.generate.model_copy(update={
            "method": "preferences", "seeds": str(paths.kept), "out": str(paths.pairs), "num": config.distill.pairs,
            "preferences": preferences})
        # preferences has no Ray plan yet: this stage runs in this process whatever `engine:` says
        local = config.model_copy(update={"generate": generate, "engine": EngineConfig()})
        say(generate_summary(run_generate(local, command_line)))
        say(format_export_summary(run_export(config, paths.pairs, "preferences", paths.preferences,
                                             command_line=command_line)))

    def run_dpo_stage() -> None:
        from datagen.finetune.dpo import format_dpo_summary, train_dpo

        settings = config.dpo.model_copy(update={"base": str(paths.student)})
        say(format_dpo_summary(train_dpo(settings, paths.preferences / "train.jsonl", paths.dpo_student)))

    def run_dpo_eval_stage() -> None:
        from datagen.finetune.dpo_eval import evaluate_dpo, format_dpo_eval

        say(format_dpo_eval(evaluate_dpo(config.eval, paths.preferences / "test.jsonl", paths.dpo_student,
                                         paths.dpo_eval, teacher_config=config.teacher)))

    runners = {"generate": run_generate_stage, "filter": run_filter_stage, "export": run_export_stage,
               "finetune": run_finetune_stage, "eval": run_eval_stage, "preferences": run_preferences_stage,
               "dpo": run_dpo_stage, "dpo-eval": run_dpo_eval_stage}
    outcome: dict[str, Any] = {}
    for stage in stages:
        record = state["stages"].get(stage, {})
        if record.get("fingerprint") == wanted[stage] and record.get("status") == "done" and stage not in forced:
            say(f"== {stage}: done before, skipped")
            outcome[stage] = "skipped"
            continue
        if record.get("fingerprint") != wanted[stage] or stage in forced:
            _clear_stage_output(stage, paths)
        say(f"== {stage}")
        state["stages"][stage] = {"fingerprint": wanted[stage], "status": "running"}
        atomic_write_json(paths.state, state)
        started = time.monotonic()
        runners[stage]()
        state["stages"][stage] = {"fingerprint": wanted[stage], "status": "done",
                                  "seconds": round(time.monotonic() - started, 1),
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(paths.state, state)
        outcome[stage] = "ran"
    report = json.loads((paths.eval / "report.json").read_text())
    result = {"stages": outcome, "report": report, "workdir": str(paths.workdir)}
    if config.distill.dpo:
        result["dpo_report"] = json.loads((paths.dpo_eval / "report.json").read_text())
    return result


def _clear_stage_output(stage: str, paths: Paths) -> None:
    """Remove what a stage wrote under other settings, so it cannot be resumed into.

    Generation output is kept on purpose: it is the paid-for part, and the generator
    continues it (see the module docstring).
    """
    if stage == "finetune":
        shutil.rmtree(paths.student, ignore_errors=True)
    elif stage == "eval":
        shutil.rmtree(paths.eval, ignore_errors=True)
    elif stage == "preferences":  # made partly by the student, which changed: the teacher's part is cached
        for path in (paths.pairs, rejects_path(paths.pairs), summary_path(paths.pairs), progress_path(paths.pairs)):
            path.unlink(missing_ok=True)
        shutil.rmtree(paths.preferences, ignore_errors=True)
    elif stage == "dpo":
        shutil.rmtree(paths.dpo_student, ignore_errors=True)
    elif stage == "dpo-eval":
        shutil.rmtree(paths.dpo_eval, ignore_errors=True)
