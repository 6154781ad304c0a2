"""The whole config file: one section per stage, each a strict pydantic model owned by
the module that runs that stage.

    teacher:  datagen.teachers.TeacherConfig  (backend, model, sampling, limits, cache)
    generate: datagen.generate.GenerateConfig (method, seeds, num, per-method sections)
    engine:   datagen.engines.config.EngineConfig (local, or ray: address, replicas, ...)
    filter:   datagen.filtering.FilterConfig  (passes and their settings)
    export:   datagen.export.ExportConfig     (splits, languages, Natural-Instructions fields)
    finetune: datagen.finetune.sft.FinetuneConfig      (LoRA / QLoRA SFT)
    dpo:      datagen.finetune.dpo.DPOConfig           (LoRA / QLoRA DPO on preference pairs)
    eval:     datagen.finetune.evaluate.EvalConfig     (base vs tuned on held-out tasks)
    distill:  datagen.distill.DistillConfig   (workdir and extra export formats)

    config = load_config("run.yaml", {"teacher.model": ("--model", "gpt-4o-mini")})

The building blocks (strict base model, YAML reading, dotted overrides) are in
`datagen.config`; this module only assembles the sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import model_validator

from datagen.config import Strict, read_yaml, validate_config
from datagen.distill import DistillConfig
from datagen.engines.config import EngineConfig
from datagen.export.config import ExportConfig
from datagen.filtering import FilterConfig
from datagen.finetune.dpo import DPOConfig
from datagen.finetune.evaluate import EvalConfig
from datagen.finetune.sft import FinetuneConfig
from datagen.generate import GenerateConfig
from datagen.teachers import TeacherConfig


class Config(Strict):
    teacher: TeacherConfig = TeacherConfig()
    generate: GenerateConfig = GenerateConfig()
    engine: EngineConfig = EngineConfig()
    filter: FilterConfig = FilterConfig()
    export: ExportConfig = ExportConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    dpo: DPOConfig = DPOConfig()
    eval: EvalConfig = EvalConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _one_generic_system(self) -> Config:
        # training on task JSONL with prompt erasure must use the system message the export would
        for stage in (self.finetune, self.eval):
            if stage.generic_system is None:
                stage.generic_system = self.generate.orca.generic_system
        return self


def load_config(path: str | Path | None = None, overrides: dict[str, tuple[str, Any]] | None = None) -> Config:
    """Load the config file at `path` (defaults when None), apply CLI `overrides`
    (dotted path -> (flag, value)), and validate the whole of it."""
    data = read_yaml(path) if path else {}
    return validate_config(Config, data, str(path) if path else "config", overrides)
