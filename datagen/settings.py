"""The whole config file: one section per stage, each a strict pydantic model.

    teacher:  datagen.config.TeacherConfig   (backend, model, sampling, limits, cache)
    generate: GenerateConfig                  (method, seeds, num, per-method sections)
    filter:   datagen.filtering.FilterConfig  (passes and their settings)
    export:   datagen.export.ExportConfig     (splits, languages, Natural-Instructions fields)
    finetune: datagen.finetune.sft.FinetuneConfig      (LoRA / QLoRA SFT)
    eval:     datagen.finetune.evaluate.EvalConfig     (base vs tuned on held-out tasks)
    distill:  datagen.distill.DistillConfig   (workdir and extra export formats)

Load with `datagen.config.load_config(path, overrides)`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from datagen.config import Strict, TeacherConfig
from datagen.distill import DistillConfig
from datagen.export.config import ExportConfig
from datagen.filtering import FilterConfig
from datagen.finetune.evaluate import EvalConfig
from datagen.finetune.sft import FinetuneConfig
from datagen.generators.alpaca import AlpacaConfig
from datagen.generators.evol_instruct import EvolInstructConfig
from datagen.generators.orca import OrcaConfig
from datagen.generators.self_instruct import SelfInstructConfig

Method = Literal["self-instruct", "alpaca", "evol-instruct", "orca"]


class GenerateConfig(Strict):
    method: Method = "self-instruct"
    seeds: str | None = None  # default: the seed set bundled with the package
    out: str | None = None
    num: int = Field(20, ge=1)
    seed: int = 0
    instances_per_task: int = Field(1, ge=1)
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    alpaca: AlpacaConfig = AlpacaConfig()
    evol_instruct: EvolInstructConfig = EvolInstructConfig()
    orca: OrcaConfig = OrcaConfig()


class Config(Strict):
    teacher: TeacherConfig = TeacherConfig()
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    export: ExportConfig = ExportConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    distill: DistillConfig = DistillConfig()
