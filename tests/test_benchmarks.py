"""External benchmarks of `datagen eval` (datagen.finetune.benchmarks): Super-NaturalInstructions on
the shipped sample with the embedded model, the judged win rate with the real vLLM server as judge,
and the pure parts (NI prompt and ROUGE-L, the length-controlled estimator, spec parsing, naming)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from datagen.errors import ConfigError, InputError
from datagen.finetune.benchmarks import BenchmarkOptions, make_benchmarks, needs_judge, parse_spec
from datagen.finetune.judged import (
    fit_soft_logistic,
    is_extreme_change,
    judge_warnings,
    judged_summary,
    length_controlled_win_rate,
    length_features,
    parameter_count,
)
from datagen.finetune.ni_bench import NI_SAMPLE, best_rouge_l, ni_examples, ni_prompt, rouge_l, task_files
from datagen.structured import VERDICT_SCHEMA
from datagen.teachers.teacher import schema_text
from tests.helpers import run_cli, single_error_line

CONTAINERS = "task1159_bard_analogical_reasoning_containers"
DEFINITION = ('Definition: Two analogies that relate items to the associated containers is given in the form "A : B. '
              'C : ?". "A : B" relates item A to its associated container B. Your task is to replace the question '
              'mark (?) with the appropriate container for the given item C, following the "A : B" relation.\n\n')


# ---------------------------------------------------------------- NI: prompt, split, ROUGE-L


def test_ni_prompts_are_tk_instructs_layout_pinned_for_one_instance():
    task = json.loads((NI_SAMPLE / "tasks" / f"{CONTAINERS}.json").read_text())
    instance = "Now complete the following example -\nInput: jam : jar. potatoes : ?\nOutput: "
    assert ni_prompt(task, "jam : jar. potatoes : ?") == DEFINITION + instance
    assert ni_prompt(task, "jam : jar. potatoes : ?", positives=2) == (
        DEFINITION
        + " Positive Example 1 -\nInput: soda : can. water : ?\n Output: bottle.\n\n"
        + " Positive Example 2 -\nInput: jam : jar. cereal : ?\n Output: box.\n\n" + instance)
    # a definition given as a list (the current NI files) reads its first entry; "?" is punctuation already
    assert ni_prompt({**task, "Definition": ["Say it"]}, "Why?").startswith("Definition: Say it.\n\nNow complete")


def test_ni_reads_a_checkout_split_a_task_folder_and_a_task_file(tmp_path):
    order = (NI_SAMPLE / "splits" / "default" / "test_tasks.txt").read_text().split()
    assert [f.stem for f in task_files(None)] == order  # the sample, laid out as a checkout
    folder = tmp_path / "export"  # `datagen export --format natural-instructions` without a split file
    shutil.copytree(NI_SAMPLE / "tasks", folder / "tasks")
    assert [f.stem for f in task_files(folder)] == sorted(order)
    examples = ni_examples(folder / "tasks" / f"{CONTAINERS}.json", instances_per_task=2)
    assert [(e.task, e.references) for e in examples] == [(CONTAINERS, ("sack",)), (CONTAINERS, ("bag",))]
    assert len(ni_examples(None, instances_per_task=100)) == 15  # 3 tasks x 5 instances shipped
    (folder / "splits" / "default").mkdir(parents=True)
    (folder / "splits" / "default" / "test_tasks.txt").write_text("task999_missing\n")
    with pytest.raises(InputError, match="1 listed tasks are not in"):
        task_files(folder)
    with pytest.raises(InputError, match="no such NI checkout"):
        task_files(tmp_path / "nowhere")


def test_ni_rouge_l_is_rouge_scores_with_the_stemmer_best_over_references():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # the NI evaluation's default scorer
    pairs = [("The running dogs were jumping quickly.", "Dogs run and jump quickly"), ("bottles", "bottle"),
             ("Answer: 1", "1"), ("", "sack"), ("carefully studied universities", "careful study of university")]
    for prediction, reference in pairs:
        assert rouge_l(prediction, reference) == scorer.score(reference, prediction)["rougeL"].fmeasure
    assert best_rouge_l("a jug", ["bottle", "jug"]) == rouge_l("a jug", "jug") > 0


# ---------------------------------------------------------------- judged: the length-controlled win rate


def test_soft_logistic_fit_is_the_minimum_of_its_objective():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    features = np.column_stack([np.ones(40), np.tanh(rng.normal(size=40))])
    targets = rng.choice([0.0, 0.5, 1.0], size=40)

    def objective(w):
        z = features @ w
        return float(np.sum(np.logaddexp(0, z) - targets * z) + 0.005 * w @ w)

    expected = minimize(objective, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(fit_soft_logistic(features, targets, penalty=0.01), expected, atol=1e-5)


def test_length_controlled_win_rate_removes_a_length_bias():
    # equal lengths: the length term is zero and the controlled rate is the raw one (up to the tiny penalty)
    points = [1, 1, 0.5, 0, 1, 0, 1, 0.5]
    flat = length_controlled_win_rate(points, [50] * 8, [40] * 8)
    assert flat["lc_win_rate"] == pytest.approx(np.mean(points), abs=0.01) and flat["length_coefficient"] == 0
    # a judge that prefers whichever is longer (5 in 6 when the student is longer, 1 in 6 when shorter) and
    # a student that is longer twice as often: raw 11/18, but at equal length the two are even
    lengths = [300] * 12 + [100] * 6
    biased = ([1] * 5 + [0]) * 2 + [1] + [0] * 5
    controlled = length_controlled_win_rate(biased, lengths, [200] * 18)
    assert np.mean(biased) == pytest.approx(11 / 18) and controlled["length_coefficient"] > 1
    assert controlled["lc_win_rate"] == pytest.approx(0.5, abs=0.01)
    assert length_features([1, 2], [1, 2]).tolist() == [0, 0]
    assert length_controlled_win_rate([], [], []) is None
    assert is_extreme_change(0.5, 0.2) and not is_extreme_change(0.5, 0.55)


def test_judged_summary_counts_both_orders_ties_and_unreadable_verdicts():
    replies, references = ["long answer " * 5, "ok", "fine"], ["ref", "reference", "r"]
    judgements = [(0, 1.0), (0, 0.5), (1, 0.0), (1, None), (2, 0.5), (2, 1.0)]
    summary = judged_summary(judgements, replies, references)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["unreadable"]) == (2, 2, 1, 1)
    assert summary["win_rate"] == round(3 / 5, 4)
    expected = length_controlled_win_rate([1.0, 0.5, 0.0, 0.5, 1.0], [60, 60, 2, 4, 4], [3, 3, 9, 1, 1])
    assert summary["lc_win_rate"] == expected["lc_win_rate"]


def test_the_judge_is_flagged_when_it_is_the_base_or_no_bigger():
    assert parameter_count("HuggingFaceTB/SmolLM2-1.7B-Instruct") == 1.7e9
    assert parameter_count("smollm2-135m") == 135e6 and parameter_count("gpt-4o-mini") is None
    assert "own base model" in judge_warnings("smollm2-135m", "smollm2-135m", "out/student/merged")[0]
    assert "no larger" in judge_warnings("Qwen2.5-0.5B-Instruct", "SmolLM2-1.7B", "out/student")[0]
    assert judge_warnings("Llama-3.1-70B-Instruct", "smollm2-135m", "out/student") == []
    assert judge_warnings("gpt-4o", "smollm2-135m", "out/student") == []  # size unknown: no claim


# ---------------------------------------------------------------- specs, errors and naming


def test_benchmark_specs_names_paths_and_bad_ones(tmp_path):
    reference_file = tmp_path / "alpaca.json"
    reference_file.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    assert parse_spec("ni") == ("ni", None) and parse_spec("ni-2pos:/data/ni") == ("ni-2pos", "/data/ni")
    assert parse_spec(str(NI_SAMPLE)) == ("ni", str(NI_SAMPLE))
    assert parse_spec(str(reference_file)) == ("judged", str(reference_file))
    assert needs_judge(["ni", str(reference_file)]) and not needs_judge(["ni", "nosuch"])
    with pytest.raises(ConfigError, match="'nosuch': not a benchmark"):
        parse_spec("nosuch")
    with pytest.raises(ConfigError, match="needs a file"):
        make_benchmarks(["judged"], BenchmarkOptions())
    with pytest.raises(ConfigError, match="given twice"):
        make_benchmarks(["ni", f"ni:{NI_SAMPLE}"], BenchmarkOptions(ni_instances=1))


def test_a_bad_benchmark_or_a_missing_ni_folder_is_one_line(tmp_path):
    result = run_cli("eval", "--tuned", "smollm2-135m", "--out", str(tmp_path / "eval"), "--benchmark", "nosuch")
    assert result.returncode == 2 and "--benchmark 'nosuch': not a benchmark" in single_error_line(result)
    result = run_cli("eval", "--tuned", "smollm2-135m", "--out", str(tmp_path / "eval"),
                     "--benchmark", f"ni:{tmp_path / 'no-ni'}")
    assert result.returncode == 1 and "no-ni: no such NI checkout" in single_error_line(result)
    assert not (tmp_path / "eval").exists()  # failed before any model loaded or anything was written


def test_held_out_references_are_named_for_what_made_them(tmp_path):
    from datagen.finetune.evaluate import REFERENCE_LABEL, TEACHER_LABEL, reference_kind

    made = {"id": "t1", "instruction": "Add.", "instances": [{"input": "1+1", "output": "2"}],
            "lineage": {"generator": "self-instruct", "teacher_backend": "vllm", "teacher_model": "big-teacher"}}
    seed = {"id": "s1", "instruction": "Greet.", "instances": [{"input": "", "output": "Hello."}]}
    kept = tmp_path / "kept.jsonl"
    kept.write_text(json.dumps(made) + "\n")
    assert reference_kind(kept) == {"label": TEACHER_LABEL, "teachers": ["big-teacher"]}
    export = tmp_path / "dataset"  # an export folder's test.jsonl: the lineage of the tasks it came from
    export.mkdir()
    (export / "test.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+1"},
                                                                {"role": "assistant", "content": "2"}]}) + "\n")
    (export / "export.json").write_text(json.dumps({"input": str(kept)}))
    assert reference_kind(export / "test.jsonl")["label"] == TEACHER_LABEL
    kept.write_text(json.dumps(made) + "\n" + json.dumps(seed) + "\n")  # a human-written seed among them
    assert reference_kind(export / "test.jsonl") == {"label": REFERENCE_LABEL, "teachers": []}
    (export / "export.json").unlink()
    assert reference_kind(export / "test.jsonl")["label"] == REFERENCE_LABEL


# ---------------------------------------------------------------- end to end, real models


@pytest.mark.slow
def test_ni_in_both_settings_and_the_judged_win_rate_through_the_cli(vllm_server, tmp_path):
    """One student load for all three: NI on the shipped sample (2 tasks x 2 instances) in both prompt
    settings, and the win rate over 3 references judged by the real vLLM server in both orders."""
    from datagen.finetune.evaluate import EvalConfig, judge_messages, parse_verdict
    from datagen.teachers.base import Request
    from datagen.teachers.cache import RequestCache, request_key

    rows = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
            {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
            {"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    reference_file = tmp_path / "references.json"
    reference_file.write_text(json.dumps(rows))
    config = tmp_path / "eval.yaml"
    config.write_text(f"teacher: {{cache_dir: {tmp_path / 'judge'}}}\n"
                      "eval:\n  engine: local\n  samples_in_report: 4\n"
                      "  benchmark: {ni_instances: 2, ni_tasks: 2, ni_max_new_tokens: 4, judged_max_new_tokens: 8}\n")
    out = tmp_path / "eval"
    result = run_cli("eval", "--tuned", "smollm2-135m", "--out", str(out), "-c", str(config),
                     "--benchmark", "ni", "--benchmark", "ni-2pos", "--benchmark", f"judged:{reference_file}",
                     "--backend", "openai", "--base-url", vllm_server, "--model", "smollm2-135m",
                     env={"DATAGEN_PROGRESS_INTERVAL": "0"})
    assert result.returncode == 0, result.stderr
    assert "ni base: done 4/4 (100%)" in result.stderr and "ni-2pos base: done 4/4 (100%)" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["data"] is None and [b["name"] for b in report["benchmarks"]] == ["ni", "ni-2pos", "judged"]
    for entry, positives in zip(report["benchmarks"], (0, 2)):
        examples = ni_examples(None, positives=positives, instances_per_task=2, max_tasks=2)
        assert [s["request"] for s in entry["samples"]] == [e.prompt for e in examples]
        [row] = entry["metrics"]
        for model in ("base", "tuned"):  # the NI figure again from the replies in the report
            scores = [best_rouge_l(s[model], e.references) for s, e in zip(entry["samples"], examples)]
            assert row[model] == round(100 * sum(scores) / 4, 2)
            assert all(len(s[model].split()) <= 4 for s in entry["samples"])  # greedy, 4 new tokens at most

    judged = report["benchmarks"][2]
    assert "own base model" in judged["warnings"][0]  # the judge here is the student's base
    cache = RequestCache(tmp_path / "judge" / "requests.sqlite")
    params = EvalConfig().judge_sampling.model_copy(update={"n": 1})
    for model in ("base", "tuned"):  # every verdict again from the judge's cached replies, in both orders
        judgements = []
        for index, sample in enumerate(judged["samples"]):
            assert sample["reference"] == rows[index]["output"]
            for student, answers in (("A", (sample[model], sample["reference"])),
                                     ("B", (sample["reference"], sample[model]))):
                request = Request.build(judge_messages(sample["request"], *answers), params, 0,
                                            schema=schema_text(VERDICT_SCHEMA))
                reply = cache.get(request_key("openai", "smollm2-135m", request))
                assert reply is not None, f"the judge was not asked about {sample['request']!r} that way"
                verdict = parse_verdict(reply.text)
                judgements.append((index, None if verdict is None else
                                   0.5 if verdict == "tie" else float(verdict == student)))
        expected = judged_summary(judgements, [s[model] for s in judged["samples"]], [r["output"] for r in rows])
        assert judged["judge"][model] == expected
        assert (expected["lc_win_rate"] is None) == (expected["win_rate"] is None)  # beside every raw figure
        assert {m["metric"]: m[model] for m in judged["metrics"]} == {
            "win_rate": expected["win_rate"], "lc_win_rate": expected["lc_win_rate"]}
    cache.close()
    markdown = (out / "report.md").read_text()
    assert "| ni-2pos | ROUGE-L x100 (NI paper's; higher is better) |" in markdown
    assert "| judged | length-controlled win rate (AlpacaEval 2 style) |" in markdown
    assert "external benchmarks:" in result.stderr and "judged lc_win_rate: base" in result.stderr
