"""`datagen eval` for a DPO student: reward accuracy and margin on held-out pairs and, with
`eval.judge`, the teacher-judged win rate of the DPO student over the model it started from.

    datagen eval out/preferences --tuned out/dpo --out out/dpo-eval

The policy is the DPO output's base plus adapter, the reference the same base with the
adapter disabled. It writes `OUT/report.json` and `OUT/report.md`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datagen.errors import InputError
from datagen.finetune.config import SFT_ONLY_FIELDS, DPOConfig
from datagen.finetune.losses import check_fast_loss, to_device
from datagen.finetune.model import load_tokenizer
from datagen.finetune.pairs import collate_pairs, encode_pair, load_pairs, pair_metrics, reference_logps
from datagen.io import atomic_write_json, atomic_write_text


def evaluate_pairs(student: str | Path, data: str | Path, *, max_pairs: int | None = None,
                   batch_size: int = 4) -> dict[str, Any]:
    """Reward accuracy and margin of a DPO output folder on held-out pairs: the policy is its
    base plus adapter, the reference the same base with the adapter disabled."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = Path(student)
    summary_file = folder / "summary.json"
    if not (folder / "adapter" / "adapter_config.json").exists() or not summary_file.exists():
        raise InputError(f"{folder}: not a `datagen finetune --method dpo` output (no adapter/ and summary.json)")
    summary = json.loads(summary_file.read_text())
    # outputs made before DPO's config lost SFT's fields still carry them
    settings = {k: v for k, v in summary["config"].items() if k not in SFT_ONLY_FIELDS}
    config = DPOConfig.model_validate({**settings, "batch_size": batch_size})
    pairs = load_pairs(data)[:max_pairs] if max_pairs else load_pairs(data)
    tokenizer, pad_id = load_tokenizer(str(folder / "adapter"))
    encoded = [encode_pair(tokenizer, pair) for pair in pairs]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(summary["base_path"], dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
    fast = check_fast_loss(model, to_device(collate_pairs(encoded, [0], pad_id), device)) is None
    reference = reference_logps(model, encoded, pad_id, device, batch_size * 2, fast)
    metrics = pair_metrics(model, encoded, reference, config, pad_id, device, fast)
    return {"data": str(data), "pairs": len(encoded), "student": str(folder), "base": summary["base_path"],
            **metrics}


def is_dpo_output(folder: str | Path) -> bool:
    """Whether `folder` is a `datagen finetune --method dpo` output."""
    summary = Path(folder) / "summary.json"
    try:
        return summary.exists() and json.loads(summary.read_text()).get("method") == "dpo"
    except json.JSONDecodeError:
        return False


def evaluate_dpo(config, data: str | Path, tuned: str | Path, out_dir: str | Path, teacher_config=None
                 ) -> dict[str, Any]:
    """`datagen eval` for a DPO student: reward accuracy and margin on held-out pairs (an
    export folder's `test.jsonl`, or a pairs file) and, with `eval.judge`, the teacher-judged
    win rate of the DPO student over the model it started from (the SFT student), each pair
    judged in both orders. Writes `OUT/report.json` and `OUT/report.md`."""
    from datagen.finetune.data import Conversation
    from datagen.finetune.evaluate import held_out_path, score_model, win_rate

    source = held_out_path(data)
    report: dict[str, Any] = {"kind": "dpo", **evaluate_pairs(tuned, source, max_pairs=config.max_examples,
                                                               batch_size=config.batch_size)}
    if config.judge:
        from datagen.teachers import TeacherConfig
        from datagen.teachers.teacher import make_teacher

        pairs = load_pairs(source)[: config.max_examples] if config.max_examples else load_pairs(source)
        conversations = [Conversation(p.prompt + (("assistant", p.chosen),), p.source) for p in pairs]
        merged = Path(tuned) / "merged"
        if not (merged / "config.json").exists():
            raise InputError(f"{tuned}: no merged/ model to generate with (train with merge: true)")
        before = score_model(report["base"], conversations, config, "base")
        after = score_model(str(merged), conversations, config, "tuned")
        requests = ["\n\n".join(c for r, c in p.prompt if r == "user") for p in pairs]
        with make_teacher(teacher_config or TeacherConfig()) as teacher:
            report["judge"] = win_rate(teacher, requests, after["replies"], before["replies"], config.judge_sampling)
        report["samples"] = [{"request": requests[i], "sft": before["replies"][i], "dpo": after["replies"][i]}
                             for i in range(min(config.samples_in_report, len(pairs)))]
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", format_dpo_report(report))
    return report


def format_dpo_report(report: dict[str, Any]) -> str:
    lines = ["# DPO student evaluation", "",
             f"Held-out pairs: `{report['data']}` ({report['pairs']} pairs, split by task). Student "
             f"`{report['student']}`; reference (adapter disabled): `{report['base']}`.", "",
             "| metric | value |", "| --- | --- |",
             f"| reward accuracy (chosen reward > rejected) | {report['reward_accuracy']:.4f} |",
             f"| reward margin (mean chosen - rejected) | {report['margin']:.4f} |",
             f"| chosen reward | {report['chosen_reward']:.4f} |",
             f"| rejected reward | {report['rejected_reward']:.4f} |",
             f"| DPO loss | {report['loss']:.4f} |"]
    judge = report.get("judge")
    if judge:
        rate = "n/a" if judge["win_rate"] is None else f"{judge['win_rate']:.3f}"
        lines.append(f"| judged win rate of DPO over SFT ({judge['judge']}, both orders) | {rate} |")
    for number, sample in enumerate(report.get("samples", []), start=1):
        lines += ["", f"## Sample {number}", "", sample["request"], "", "**SFT**", "", sample["sft"], "",
                  "**DPO**", "", sample["dpo"]]
    return "\n".join(lines) + "\n"


def format_dpo_eval(report: dict[str, Any]) -> str:
    """Before/after in a few lines, for the terminal."""
    text = (f"held-out pairs: {report['pairs']} ({report['data']})\n"
            f"reward accuracy {report['reward_accuracy']:.4f}, margin {report['margin']:.4f}")
    if report.get("judge"):
        text += f"\njudged win rate of DPO over SFT: {report['judge']['win_rate']}"
    return text
