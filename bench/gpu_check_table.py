"""The one summary table of bench/gpu_check.sh, read from its output folder.

    .venv/bin/python bench/gpu_check_table.py OUT_DIR

Reads what each step left there (a step that did not run, failed or ran out of time is
shown as such, never as a figure): `vllm.log` (bench/generate_overhead.py's output),
`qlora/train_log.jsonl` and `qlora/summary.json` (datagen finetune --method qlora), the same
in `qlora_dpo/` (QLoRA DPO, with reward accuracy and margin), `sft.json` (bench/sft.py --save),
`ray_vllm/orca.summary.json` (the Ray vLLM route) and each step's `NAME.status.json`. Exits 1
when a step failed, a QLoRA loss did not fall, QLoRA DPO left no positive margin and reward
accuracy above 0.5 over its pairs, or the Ray vLLM route did not write its 24 tasks cleanly.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TIMED_OUT = 124  # timeout(1)'s exit status


def step_status(out: Path, name: str) -> tuple[str, float | None]:
    path = out / f"{name}.status.json"
    if not path.exists():
        return "not run", None
    status = json.loads(path.read_text())
    word = "ok" if status["status"] == 0 else "timed out" if status["status"] == TIMED_OUT else \
        f"failed ({status['status']})"
    return word, status["seconds"]


def vllm_rows(out: Path) -> list[tuple[str, str]]:
    log = out / "vllm.log"
    text = log.read_text() if log.exists() else ""
    rates = dict(re.findall(r"^(datagen \(Teacher\.complete \+ parse\)|bare vllm\.LLM\.chat)\s+([\d.]+) tok/s",
                            text, flags=re.M))
    ratio = re.search(r"^ratio datagen / bare\s+([\d.]+)", text, flags=re.M)
    if not rates or not ratio:
        return [("vllm: generated tok/s", "-")]
    return [("vllm: datagen generate path, tok/s", rates.get("datagen (Teacher.complete + parse)", "-")),
            ("vllm: bare vllm.LLM.chat, tok/s", rates.get("bare vllm.LLM.chat", "-")),
            ("vllm: ratio datagen / bare (target >= 0.95)", ratio.group(1))]


def qlora_rows(out: Path, name: str = "qlora") -> tuple[list[tuple[str, str]], bool]:
    """Rows of a QLoRA run in OUT/NAME (SFT, or DPO with its reward figures), and whether it
    learnt: the mean loss of the last 5 logged steps below the first 5's and, for DPO, a margin
    above 0 and a reward accuracy above 0.5 over its pairs after training (both 0 at the start,
    where the policy is the reference)."""
    log_path, summary_path = out / name / "train_log.jsonl", out / name / "summary.json"
    if not log_path.exists():
        return [(f"{name}: loss", "-")], False
    losses = [json.loads(line)["loss"] for line in log_path.read_text().splitlines() if line.strip()]
    head, tail = losses[:5], losses[-5:]
    falling = len(losses) >= 10 and sum(tail) / len(tail) < sum(head) / len(head)
    rows = [(f"{name}: steps", str(len(losses))),
            (f"{name}: mean loss, first 5 -> last 5 steps",
             f"{sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f} ({'falling' if falling else 'NOT falling'})")]
    learnt = falling
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("method") == "dpo":
            accuracy, margin = summary.get("reward_accuracy"), summary.get("margin")
            preferred = accuracy is not None and margin is not None and accuracy > 0.5 and margin > 0
            learnt = learnt and preferred
            rows.append((f"{name}: reward accuracy | margin (training pairs, after)",
                         f"{accuracy} | {margin} ({'chosen preferred' if preferred else 'NOT preferred'})"))
        rows += [(f"{name}: tokens/s", str(summary.get("tokens_per_s"))),
                 (f"{name}: peak MiB (CUDA allocations)", str(summary.get("peak_memory_mib"))),
                 (f"{name}: merged model", "written" if summary.get("merged") else "-")]
    return rows, learnt


def sft_rows(out: Path) -> list[tuple[str, str]]:
    path = out / "sft.json"
    if not path.exists():
        return [("sft vs TRL", "-")]
    results = {(r["side"], r["ranks"]): r for r in json.loads(path.read_text())}
    rows = []
    for (side, ranks), r in sorted(results.items()):
        name = "datagen" if side == "ours" else "TRL"
        rows.append((f"sft: {name}, {ranks} rank(s): tok/s | s/step | peak MiB | final loss",
                     f"{r['tokens_per_s']:.1f} | {r['s_per_step']:.3f} | {r['peak_memory_mib']:.0f} | "
                     f"{r['losses'][-1]:.4f}"))
    ours, trl = results.get(("ours", 1)), results.get(("trl", 1))
    if ours and trl:
        rows.append(("sft: ratio tokens/s, datagen / TRL", f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}"))
        rows.append(("sft: ratio peak memory, datagen / TRL",
                     f"{ours['peak_memory_mib'] / trl['peak_memory_mib']:.2f}"))
    return rows


def ray_vllm_rows(out: Path) -> tuple[list[tuple[str, str]], bool]:
    """The Ray vLLM route's run (step 5): its route, tasks written, requests and failures, and
    whether it wrote all 24 tasks without a failed request."""
    path = out / "ray_vllm" / "orca.summary.json"
    if not path.exists():
        return [("ray vllm route", "-")], False
    summary = json.loads(path.read_text())
    engine = summary["engine"]
    whole = summary["tasks_total"] == 24 and summary["failures"] == 0
    return [("ray vllm route: route | replicas", f"{engine.get('route')} | {engine.get('replicas')}"),
            ("ray vllm route: tasks | requests | failures | seconds",
             f"{summary['tasks_total']} | {summary['requests_sent']} | {summary['failures']} | "
             f"{summary['wall_seconds']} ({'all written' if whole else 'NOT all written'})")], whole


def table(out: Path) -> tuple[str, bool]:
    """The table text, and whether every step ran and passed."""
    rows: list[tuple[str, str]] = []
    gpu = out / "gpu.txt"
    rows.append(("GPU", gpu.read_text().strip() if gpu.exists() else "-"))
    passed = True
    for name in ("vllm", "qlora", "qlora_dpo", "sft", "ray_vllm"):
        status, seconds = step_status(out, name)
        passed = passed and status == "ok"
        rows.append((f"step {name}", status + (f" in {seconds} s" if seconds is not None else "")))
    rows += vllm_rows(out)
    qlora, sft_learnt = qlora_rows(out, "qlora")
    qlora_dpo, dpo_learnt = qlora_rows(out, "qlora_dpo")
    ray_vllm, ray_whole = ray_vllm_rows(out)
    rows += qlora + qlora_dpo + sft_rows(out) + ray_vllm
    width = max(len(label) for label, _value in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines), passed and sft_learnt and dpo_learnt and ray_whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="bench/gpu_check.sh's output folder")
    args = parser.parse_args()
    text, passed = table(args.out)
    print(text)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
