"""Preference pairs (`--method preferences`): the exact rating prompt, the parse of sample
judge replies (malformed ones too), the pair choice, and the loop with a scripted teacher:
TRL's record shape, lineage, rejects with reasons, resume without repeated requests, and the
pairs loading unchanged in TRL's DPOTrainer data path."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from datagen.config import SamplingParams
from datagen.errors import InputError
from datagen.generate import GENERATORS
from datagen.generators.common import RunContext, TaskSink
from datagen.generators.preferences import (
    ASPECTS,
    Comparison,
    PairChoice,
    PreferencePair,
    PreferencesConfig,
    Rating,
    Responder,
    Verdict,
    choose_by_wins,
    choose_pair,
    pairwise_messages,
    pairwise_wins,
    parse_aspect_ratings,
    parse_rating,
    parse_verdict,
    prompt_messages,
    rating_messages,
    responder_plan,
    run_preferences,
    ultrafeedback_messages,
)
from datagen.io import read_records, rejects_path
from datagen.records import Instance, Task
from datagen.teachers.base import BackendCounters, Completion
from datagen.teachers.teacher import Teacher, TeacherConfig

# ---------------------------------------------------------------- prompt and parse


def test_rating_prompt_is_pinned():
    task = Task(id="t", instruction="Add the numbers.", instances=[Instance(input="2 and 3", output="5")])
    prompt = prompt_messages(task, task.instances[0])
    assert prompt == [{"role": "user", "content": "Add the numbers.\n\nInput:\n2 and 3"}]
    [message] = rating_messages(prompt, " The sum is 5. ")
    assert message["role"] == "user"
    assert message["content"] == (
        "You are rating an AI assistant's response to a user's request.\n"
        "\n"
        "Judge the response as a whole on four aspects:\n"
        "- Helpfulness: does it do what was asked, with correct and useful content?\n"
        "- Honesty: does it say when it is unsure instead of inventing an answer?\n"
        "- Instruction following: does it respect every requirement of the request, including format and length?\n"
        "- Truthfulness: is it free of factual errors and made-up details?\n"
        "\n"
        "Give one overall rating from 1 to 10:\n"
        "10: excellent; it could not be meaningfully improved\n"
        "7-9: good; minor flaws only\n"
        "4-6: partly useful; clear errors or omissions\n"
        "2-3: mostly wrong, off-topic or ignores the instructions\n"
        "1: useless, empty or harmful\n"
        "\n"
        "Request:\n"
        "Add the numbers.\n\nInput:\n2 and 3\n"
        "\n"
        "Response:\n"
        "The sum is 5.\n"
        "\n"
        "Reply in exactly this form:\n"
        "Rationale: <one or two sentences>\n"
        "Rating: <a whole number from 1 to 10>"
    )
    # an Orca task's system message and a reference answer are shown when there are ones
    orca = rating_messages([{"role": "system", "content": "Be terse."}, prompt[0]], "5", reference="5")
    assert "System message the assistant was given:\nBe terse.\n" in orca[0]["content"]
    assert "A reference answer (a good response may differ from it):\n5\n" in orca[0]["content"]


@pytest.mark.parametrize("reply, expected", [
    ("Rationale: Correct and brief.\nRating: 8", Rating(8.0, "Correct and brief.")),
    ("**Rationale:** Fine.\n**Rating:** 7/10", Rating(7.0, "Fine.")),
    ("The answer is right but terse.\n\nOverall rating: 6.5", Rating(6.5, "The answer is right but terse.")),
    ("Rating: 3\nOn reflection it is wrong.\nRating: 2", Rating(2.0, "Rating: 3\nOn reflection it is wrong.")),
    ("Score: 10", Rating(10.0, "")),
    ("I think this is a good answer.", 'no "Rating: N" line'),
    ("Rationale: ok\nRating: ten", 'no "Rating: N" line'),
    ("Rationale: great\nRating: 11", "rating 11 outside 1-10"),
    ("Rationale: bad\nRating: 0", "rating 0 outside 1-10"),
    ("", 'no "Rating: N" line'),
])
def test_judge_replies_parse(reply, expected):
    assert parse_rating(reply) == expected


@pytest.mark.parametrize("scores, pick, expected", [
    ([9, 4, 6, 8], "lowest", PairChoice(0, 1)),
    ([5, 8, 7.5, 2], "lowest", PairChoice(1, 3)),
    ([5, None, 8, None], "lowest", PairChoice(2, 0)),
    ([7, 7, 7, 7], "lowest", "all responses rated the same"),
    ([7, 7.5, None, 7], "lowest", "no response rated far enough below the best"),
    ([None, 6, None, None], "lowest", "fewer than two rated responses"),
    ([None, None, None, None], "random", "fewer than two rated responses"),
])
def test_pair_choice(scores, pick, expected):
    texts = [f"answer {i}" for i in range(len(scores))]
    assert choose_pair(scores, texts, 1.0, random.Random(0), pick) == expected


def test_a_tie_for_best_is_drawn_by_the_seed_not_given_to_the_first_responder():
    # responder 0 answers first, so "first of equals" gave it every tie
    chosen = {choose_pair([9, 4, 6, 9], list("abcd"), 1.0, random.Random(seed), "lowest").chosen for seed in range(30)}
    assert chosen == {0, 3}
    assert choose_pair([9, 4, 6, 9], list("abcd"), 1.0, random.Random(5), "lowest") == \
        choose_pair([9, 4, 6, 9], list("abcd"), 1.0, random.Random(5), "lowest")  # the same seed, the same pick
    # 0 and 2 both beat 1 and 3 in both orders: two wins each
    beats = [compared(0, 1, "A", "B"), compared(0, 3, "A", "B"), compared(2, 1, "A", "B"), compared(2, 3, "A", "B")]
    chosen = {choose_by_wins(beats, list("abcd"), 4, random.Random(seed), "lowest").chosen for seed in range(30)}
    assert chosen == {0, 2}


def test_random_rejected_is_one_far_enough_below_and_texts_must_differ():
    picks = {choose_pair([9, 4, 6, 8.5], list("abcd"), 1.0, random.Random(seed)).rejected for seed in range(30)}
    assert picks == {1, 2}
    assert choose_pair([9, 4], ["Same text.", "same text"], 1.0, random.Random(0)) == "chosen and rejected say the same"


def test_responses_go_round_robin_over_responders():
    assert responder_plan([Responder(name="a"), Responder(name="b")], 5) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]


def test_registered_as_a_generation_method():
    method = GENERATORS["preferences"]
    assert method.section == "preferences" and method.record is PreferencePair
    from datagen.config_file import load_config

    config = load_config(None, {"generate.method": ("--method", "preferences")})
    assert config.generate.preferences.responses_per_prompt == 4


# ---------------------------------------------------------------- the loop, scripted teacher


class SampledScript:
    """A backend answering from a script that sees the prompt and the request's seed, so each
    sample of a prompt can differ. Responses carry their own score, `[s=7]`, which the judge
    reads back; a few prompts and responses inject faults."""

    name, model = "scripted", "prefs"

    def __init__(self, fail_after: int | None = None):
        self.counters = BackendCounters()
        self.sent = 0
        self.fail_after = fail_after

    def generate(self, requests, on_result):
        for index, request in enumerate(requests):
            if self.fail_after is not None and self.sent >= self.fail_after:
                raise KeyboardInterrupt  # the run dies here, as under a kill
            self.sent += 1
            prompt = request.messages[-1][1]
            on_result(index, self.answer(prompt, request.params.seed, request.params.temperature))

    @staticmethod
    def answer(prompt: str, seed: int, temperature: float) -> Completion:
        if prompt.startswith("You are rating"):
            response = prompt.split("Response:\n", 1)[1].split("\n\nReply in exactly", 1)[0]
            if "[s=?]" in response:
                return Completion("Rationale: hard to say.", "stop", 50, 5)
            score = re.search(r"\[s=([\d.]+)\]", response).group(1)
            return Completion(f"Rationale: looks like {score}.\nRating: {score}", "stop", 50, 8)
        sample = seed - 7  # the run's seed is 7; sample i has seed 7 + i
        which = "hot" if temperature > 1 else "warm"
        scripted = {
            # (task, responder) -> scores of samples 0, 1
            ("Tie", "warm"): ["[s=5]", "[s=5]"], ("Tie", "hot"): ["[s=5]", "[s=5]"],
            ("Good", "warm"): ["[s=9]", "[s=3]"], ("Good", "hot"): ["[s=6]", "[s=?]"],
            ("Close", "warm"): ["[s=7]", "[s=7]"], ("Close", "hot"): ["[s=6.5]", "[s=7]"],
            ("Faults", "warm"): ["ERROR", "[s=8]"], ("Faults", "hot"): ["CUT", ""],
        }
        key = next(name for name in ("Tie", "Good", "Close", "Faults") if prompt.startswith(name))
        text = scripted[(key, which)][sample]
        if text == "ERROR":
            return Completion("", "error", error="HTTP 500")
        if text == "CUT":
            return Completion("An answer that goes on and", "length", 10, 6)
        return Completion(f"{key} answer {which} {sample} {text}" if text else "", "stop", 10, 6)

    def close(self):
        pass


SEEDS = [
    Task(id="good", instruction="Good question.", instances=[Instance(input="x", output="y")]),
    Task(id="tie", instruction="Tie question."),
    Task(id="close", instruction="Close question."),
    Task(id="faults", instruction="Faults question."),
]
SETTINGS = PreferencesConfig(
    responders=[Responder(name="warm"), Responder(name="hot", sampling={"temperature": 1.2})],
    items_per_batch=2,
)


def run(tmp_path, backend, num=10):
    teacher = Teacher(backend, TeacherConfig(cache_dir=str(tmp_path / "cache")))
    batches = []
    with TaskSink(tmp_path / "pairs.jsonl", PreferencePair) as sink:
        run_preferences(SEEDS, SETTINGS, RunContext(teacher, sink, num=num, seed=7, on_batch_done=batches.append))
    return teacher, batches


def test_pairs_rejects_and_resume_after_a_kill(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, SampledScript(fail_after=20))  # dies in the second batch
    killed_pairs = list(read_records(tmp_path / "pairs.jsonl", PreferencePair))
    assert [p.task_id for p in killed_pairs] == ["good"]  # the first batch was flushed

    teacher, batches = run(tmp_path, SampledScript())
    # nothing answered is asked again: 16 responses + 13 ratings in all, 20 sent before the
    # kill, one of them failed (failures are not cached); the tie is replayed from the cache
    assert teacher.stats.requests_sent == 29 - 20 + 1 and teacher.stats.cache_hits == 8 + 3
    assert batches == [1, 2]

    [pair] = list(read_records(tmp_path / "pairs.jsonl", PreferencePair))
    row = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert set(row) >= {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "lineage"}
    assert row["prompt"] == [{"role": "user", "content": "Good question.\n\nInput:\nx"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Good answer warm 0 [s=9]"}]
    assert row["rejected"][0]["role"] == "assistant"
    assert (pair.score_chosen, pair.rationale_chosen) == (9.0, "looks like 9.")
    assert pair.score_rejected in (3.0, 6.0)
    lineage = row["lineage"]
    assert lineage["generator"] == "preferences" and lineage["parent_ids"] == ["good"]
    assert lineage["template"] == "preference_rating.jinja" and len(lineage["template_sha256"]) == 64
    assert (lineage["teacher_backend"], lineage["teacher_model"]) == ("scripted", "prefs")
    assert lineage["sampling"]["temperature"] == 0.0 and lineage["seed"] == 7
    assert lineage["responders"]["chosen"] == {
        "name": "warm", "backend": "scripted", "model": "prefs", "sample": 0,
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256, "stop": [], "seed": 7}}
    assert [c["score"] for c in lineage["candidates"]] == [9.0, 6.0, 3.0, None]
    assert [(c["responder"], c["sample"]) for c in lineage["candidates"]] == [
        ("warm", 0), ("hot", 0), ("warm", 1), ("hot", 1)]

    rejects = [json.loads(line) for line in rejects_path(tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert all(r["stage"] == "preferences" for r in rejects)
    assert Counter(r["reason"] for r in rejects) == Counter({
        "rating unparseable": 1, "all responses rated the same": 1,
        "no response rated far enough below the best": 1, "teacher error": 1,
        "reply hit the length limit": 1, "empty response": 1, "fewer than two rated responses": 1,
    })
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["rating unparseable"]["raw"] == "Rationale: hard to say."
    assert by_reason["rating unparseable"]["detail"] == 'task good, instance 0, response 3 (hot): no "Rating: N" line'
    assert by_reason["no response rated far enough below the best"]["detail"] == (
        "task close, instance 0: ratings [7, 6.5, 7, 7]")

    before = [(tmp_path / name).read_text() for name in ("pairs.jsonl", "pairs.rejects.jsonl")]
    again, _ = run(tmp_path, SampledScript())
    assert again.stats.requests_sent == 1  # the failed request only: failures are not cached
    assert [(tmp_path / name).read_text() for name in ("pairs.jsonl", "pairs.rejects.jsonl")] == before


def test_num_caps_the_pairs(tmp_path):
    teacher, _ = run(tmp_path, SampledScript(), num=1)
    assert len(list(read_records(tmp_path / "pairs.jsonl", PreferencePair))) == 1
    assert teacher.stats.requests_sent == 4 + 4  # one prompt asked and rated


# ---------------------------------------------------------------- TRL's data path


def test_pairs_load_unchanged_in_trl_dpo_trainer(tmp_path, embedded_model_path):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'trl>=1.0', the test extra)")
    import datasets
    import transformers

    run(tmp_path, SampledScript())
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_path)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    dataset = datasets.Dataset.from_list(rows)
    trainer = trl.DPOTrainer(
        model=str(tmp_path / "tiny"), args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_steps=1,
                                        per_device_train_batch_size=1, use_cpu=True),
        train_dataset=dataset, processing_class=tokenizer)
    [example] = trainer.train_dataset
    prompt_text = tokenizer.decode(example["prompt_ids"])
    assert "Good question.\n\nInput:\nx" in prompt_text
    assert tokenizer.decode(example["chosen_ids"]).startswith("Good answer warm 0 [s=9]")


# ---------------------------------------------------------------- export


def make_pairs(task_ids, scores=(9.0, 4.0)) -> list[PreferencePair]:
    from datagen.records import Lineage

    return [PreferencePair(
        id=f"pref-{task_id}", task_id=task_id, instance_index=0,
        prompt=[{"role": "user", "content": f"Question {task_id}"}],
        chosen=[{"role": "assistant", "content": "good"}], rejected=[{"role": "assistant", "content": "bad"}],
        score_chosen=scores[0] - (number % 2), score_rejected=scores[1], rationale_chosen="r1",
        rationale_rejected="r2",
        lineage=Lineage(generator="preferences", template="preference_rating.jinja", template_sha256="abc",
                        teacher_backend="scripted", teacher_model="prefs",
                        responders={"chosen": {"name": "warm"}, "rejected": {"name": "hot"}}))
        for number, task_id in enumerate(task_ids)]


def test_preferences_export_splits_like_the_sft_export_and_loads_as_a_datasetdict(tmp_path):
    import datasets

    from datagen.config_file import load_config
    from datagen.export import run_export
    from datagen.io import write_jsonl_atomic

    seeds = tmp_path / "kept.jsonl"
    ids = [f"task-{n}" for n in range(20)]
    write_jsonl_atomic(seeds, [Task(id=i, instruction=f"Do {i}.", instances=[Instance(output="x")]) for i in ids])
    pairs_file = tmp_path / "pairs.jsonl"
    pairs = make_pairs(ids[:15])  # pairs for some tasks only: the split still follows the seed file's
    write_jsonl_atomic(pairs_file, pairs)
    (tmp_path / "pairs.summary.json").write_text(json.dumps({
        "config": {"generate": {"seeds": str(seeds)}}, "command": "datagen generate --method preferences",
        "rejects_by_reason": {"all responses rated the same": 3}}))
    config = load_config()
    sft = run_export(config, seeds, "messages", tmp_path / "sft")
    summary = run_export(config, pairs_file, "preferences", tmp_path / "prefs")

    def task_ids(folder, split):
        return {json.loads(line)["task_id"] for line in (folder / f"{split}.jsonl").read_text().splitlines()}

    for split in ("train", "validation", "test"):
        assert task_ids(tmp_path / "prefs", split) == task_ids(tmp_path / "sft", split) & set(ids[:15])
    assert summary["split_on"] == str(seeds) and summary["instances"] == 15
    assert sum(s["instances"] for s in summary["splits"].values()) == 15 and sft["tasks"] == 20
    rows = [json.loads(line) for split in ("train", "validation", "test")
            for line in (tmp_path / "prefs" / f"{split}.jsonl").read_text().splitlines()]
    assert sorted(rows, key=lambda r: r["id"]) == sorted((json.loads(p.to_json()) for p in pairs),
                                                         key=lambda r: r["id"])  # records unchanged
    loaded = datasets.load_from_disk(str(tmp_path / "prefs" / "dataset"))
    first = loaded["train"][0]
    assert first["prompt"][0]["role"] == "user" and first["chosen"] == [{"role": "assistant", "content": "good"}]
    card = (tmp_path / "prefs" / "README.md").read_text()
    assert "| 9 | 8 | 0 |" in card and "| 8 | 7 | 0 |" in card and "| 4 | 0 | 15 |" in card
    assert "`scripted:prefs` (15 pairs)" in card and "| all responses rated the same | 3 |" in card
    assert "path: data/train.parquet" in card

    seeds.unlink()  # splitting on the pairs' own ids would hold out other tasks than the SFT export
    with pytest.raises(InputError, match="kept.jsonl, which is gone"):
        run_export(config, pairs_file, "preferences", tmp_path / "prefs-again")


def test_chosen_responder_pairs_without_ratings(tmp_path):
    settings = SETTINGS.model_copy(update={"chosen_responder": "warm"})
    teacher = Teacher(SampledScript(), TeacherConfig(cache_dir=str(tmp_path / "cache")))
    with TaskSink(tmp_path / "pairs.jsonl", PreferencePair) as sink:
        run_preferences(SEEDS, settings, RunContext(teacher, sink, num=10, seed=7))
    assert teacher.stats.requests_sent == 16  # responses only: no judge
    pairs = list(read_records(tmp_path / "pairs.jsonl", PreferencePair))
    assert [p.task_id for p in pairs] == ["good", "tie", "close"]  # no rating, so no tie
    good = pairs[0]
    assert good.chosen[0]["content"] == "Good answer warm 0 [s=9]" and good.score_chosen is None
    assert good.rejected[0]["content"] in ("Good answer hot 0 [s=6]", "Good answer hot 1 [s=?]")
    assert good.lineage.operation == "preferences:responder" and good.lineage.template is None
    assert good.lineage.responders["chosen"]["name"] == "warm"
    rejects = [json.loads(line) for line in rejects_path(tmp_path / "pairs.jsonl").read_text().splitlines()]
    # faults: warm's sample 1 is usable, but hot's replies were cut off and empty
    assert Counter(r["reason"] for r in rejects) == Counter({
        "teacher error": 1, "reply hit the length limit": 1, "empty response": 1,
        "no usable reply from another responder": 1})

    from datagen.config_file import load_config
    from datagen.export import run_export

    run_export(load_config(), tmp_path / "pairs.jsonl", "preferences", tmp_path / "prefs")  # unrated pairs export
    exported = [pair for split in ("train", "validation", "test")
                for pair in read_records(tmp_path / "prefs" / f"{split}.jsonl", PreferencePair)]
    assert sorted(p.id for p in exported) == sorted(p.id for p in pairs)  # and read back
    card = (tmp_path / "prefs" / "README.md").read_text()
    assert "3 pairs are not rated (chosen by responder, `chosen_responder`)." in card


def test_chosen_responder_must_be_a_responder():
    with pytest.raises(ValueError, match="chosen_responder 'student' is not a responder"):
        PreferencesConfig(chosen_responder="student")
    with pytest.raises(ValueError, match="needs a second responder"):
        PreferencesConfig(responders=[Responder(name="a")], chosen_responder="a")
    with pytest.raises(ValueError, match="chosen_responder judges nothing, so judging: pairwise has no effect"):
        PreferencesConfig(responders=[Responder(name="a"), Responder(name="b")], chosen_responder="a",
                          judging="pairwise")


# ---------------------------------------------------------------- pairwise judging, both orders


def test_pairwise_prompt_is_pinned():
    task = Task(id="t", instruction="Add the numbers.", instances=[Instance(input="2 and 3", output="5")])
    prompt = prompt_messages(task, task.instances[0])
    [message] = pairwise_messages(prompt, " The sum is 5. ", "It is 6.\n")
    assert message["role"] == "user"
    assert message["content"] == (
        "You are comparing two AI assistants' responses to the same user request.\n"
        "\n"
        "Judge each response as a whole on four aspects:\n"
        "- Helpfulness: does it do what was asked, with correct and useful content?\n"
        "- Honesty: does it say when it is unsure instead of inventing an answer?\n"
        "- Instruction following: does it respect every requirement of the request, including format and length?\n"
        "- Truthfulness: is it free of factual errors and made-up details?\n"
        "\n"
        "Decide which response is better overall. Judge the content, not the length or the order in which the "
        "responses appear. Say tie when neither is clearly better.\n"
        "\n"
        "Request:\n"
        "Add the numbers.\n\nInput:\n2 and 3\n"
        "\n"
        "Response A:\n"
        "The sum is 5.\n"
        "\n"
        "Response B:\n"
        "It is 6.\n"
        "\n"
        "Reply in exactly this form:\n"
        "Rationale: <one or two sentences>\n"
        "Verdict: <A, B or tie>"
    )
    orca = pairwise_messages([{"role": "system", "content": "Be terse."}, prompt[0]], "5", "6", reference="5")
    assert "System message the assistants were given:\nBe terse.\n" in orca[0]["content"]
    assert "A reference answer (a good response may differ from it):\n5\n" in orca[0]["content"]


@pytest.mark.parametrize("reply, expected", [
    ("Rationale: A adds correctly.\nVerdict: A", Verdict("A", "A adds correctly.")),
    ("**Rationale:** Both fine.\n**Verdict:** tie", Verdict("tie", "Both fine.")),
    ("Rationale: B is right.\nVerdict: [[B]]", Verdict("B", "B is right.")),
    ("B is correct, A is not.\n\nVerdict: Response B.", Verdict("B", "B is correct, A is not.")),
    ("Verdict: a", Verdict("A", "")),
    ("Verdict: A\nOn reflection B is right.\nVerdict: B", Verdict("B", "Verdict: A\nOn reflection B is right.")),
    ("Response A is better.", 'no "Verdict: A|B|tie" line'),
    ("Rationale: hard to say.\nVerdict: A or B", "verdict names none of A, B, tie: 'Verdict: A or B'"),
    ("Verdict: C", "verdict names none of A, B, tie: 'Verdict: C'"),
    ("Verdict: B\nVerdict: both", "verdict names none of A, B, tie: 'Verdict: both'"),
    ("Rationale: fine\nRating: 8", 'no "Verdict: A|B|tie" line'),
    ("", 'no "Verdict: A|B|tie" line'),
])
def test_pairwise_judge_replies_parse(reply, expected):
    assert parse_verdict(reply) == expected


def compared(first, second, forward, backward):
    return Comparison(first, second, forward and Verdict(forward, ""), backward and Verdict(backward, ""))


@pytest.mark.parametrize("forward, backward, winner", [
    ("A", "B", 0),  # first preferred in both orders
    ("B", "A", 1),  # second preferred in both orders
    ("A", "A", None),  # always the response shown first: position bias is a tie, not a win
    ("B", "B", None),
    ("tie", "B", None),
    ("A", None, None),  # one order unreadable: not judged
])
def test_a_win_counts_only_when_both_orders_agree(forward, backward, winner):
    assert compared(0, 1, forward, backward).winner == winner


@pytest.mark.parametrize("comparisons, usable, pick, expected", [
    # 0 beats 1 and 2, 1 beats 2: 0 is chosen; lowest: 2 (no wins)
    ([(0, 1, "A", "B"), (0, 2, "A", "B"), (1, 2, "A", "B")], 3, "lowest", PairChoice(0, 2)),
    # only 2 beats anyone; position-biased verdicts elsewhere are ties
    ([(0, 1, "A", "A"), (0, 2, "B", "A"), (1, 2, "A", "A")], 3, "lowest", PairChoice(2, 0)),
    ([(0, 1, "A", "A"), (0, 2, "tie", "tie"), (1, 2, "B", "B")], 3, "lowest",
     "no response beat another in both orders"),
    ([(0, 1, None, "B"), (0, 2, "A", None)], 3, "lowest", "no pair judged in both orders"),
    ([], 1, "random", "fewer than two usable responses"),
])
def test_pair_choice_by_wins(comparisons, usable, pick, expected):
    texts = ["answer 0", "answer 1", "answer 2"]
    assert choose_by_wins([compared(*c) for c in comparisons], texts, usable, random.Random(0), pick) == expected


def test_pairwise_rejected_is_one_chosen_beat_and_texts_must_differ():
    beats = [compared(0, 1, "A", "B"), compared(0, 2, "B", "A"), compared(0, 3, "A", "B"), compared(1, 2, "A", "B")]
    assert pairwise_wins(beats, 4) == [2, 1, 1, 0]
    picks = {choose_by_wins(beats, list("abcd"), 4, random.Random(seed)).rejected for seed in range(30)}
    assert picks == {1, 3}  # never 2: chosen lost to it
    same = [compared(0, 1, "A", "B")]
    assert choose_by_wins(same, ["Same text.", "same text"], 2, random.Random(0)) == "chosen and rejected say the same"


class PairwiseScript(SampledScript):
    """SampledScript's responders with a pairwise judge: it prefers the higher `[s=N]`, says tie
    for equal ones, always answers A on the Close task (a position-biased judge) and writes an
    unreadable verdict whenever the `[s=?]` reply is shown first."""

    @staticmethod
    def answer(prompt: str, seed: int, temperature: float) -> Completion:
        if not prompt.startswith("You are comparing"):
            return SampledScript.answer(prompt, seed, temperature)
        a = prompt.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
        b = prompt.split("Response B:\n", 1)[1].split("\n\nReply in exactly", 1)[0]
        if "[s=?]" in a:
            return Completion("Rationale: hard to say.\nVerdict: A or B", "stop", 80, 9)
        if a.startswith("Close"):
            return Completion("Rationale: the first reads better.\nVerdict: A", "stop", 80, 9)
        score_a, score_b = (float(re.search(r"\[s=([\d.?]+)\]", text).group(1).replace("?", "0")) for text in (a, b))
        better = "A" if score_a > score_b else "B" if score_b > score_a else "tie"
        return Completion(f"Rationale: {score_a:g} against {score_b:g}.\nVerdict: {better}", "stop", 80, 9)


PAIRWISE_SETTINGS = SETTINGS.model_copy(update={"judging": "pairwise", "rejected_pick": "lowest"})


def run_pairwise(tmp_path):
    teacher = Teacher(PairwiseScript(), TeacherConfig(cache_dir=str(tmp_path / "cache")))
    with TaskSink(tmp_path / "pairs.jsonl", PreferencePair) as sink:
        run_preferences(SEEDS, PAIRWISE_SETTINGS, RunContext(teacher, sink, num=10, seed=7))
    return teacher


def test_pairwise_judging_pairs_rejects_and_replay(tmp_path):
    teacher = run_pairwise(tmp_path)
    # 16 responses; Good, Tie and Close have 4 usable replies each: 6 comparisons x 2 orders
    assert teacher.stats.requests_sent == 16 + 3 * 12
    [pair] = list(read_records(tmp_path / "pairs.jsonl", PreferencePair))
    assert pair.task_id == "good"
    # candidates: warm 0 [s=9], hot 0 [s=6], warm 1 [s=3], hot 1 [s=?]; 0 beats 1 and 2, 1 beats 2
    assert pair.chosen == [{"role": "assistant", "content": "Good answer warm 0 [s=9]"}]
    assert pair.rejected == [{"role": "assistant", "content": "Good answer warm 1 [s=3]"}]  # lowest: fewest wins
    assert pair.score_chosen is None and pair.score_rejected is None
    lineage = json.loads((tmp_path / "pairs.jsonl").read_text())["lineage"]
    assert lineage["judging"] == "pairwise" and lineage["operation"] == "preferences:pairwise"
    assert lineage["template"] == "preference_pairwise.jinja" and len(lineage["template_sha256"]) == 64
    assert (lineage["teacher_backend"], lineage["teacher_model"]) == ("scripted", "prefs")
    assert lineage["decisive"] == {"a": 0, "b": 2, "verdicts": ["A", "B"], "winner": 0,
                                   "rationales": ["9 against 3.", "3 against 9."]}
    assert [c["wins"] for c in lineage["candidates"]] == [2, 1, 0, 0]
    assert [(c["a"], c["b"], c["verdicts"], c["winner"]) for c in lineage["comparisons"]] == [
        (0, 1, ["A", "B"], 0), (0, 2, ["A", "B"], 0), (0, 3, ["A", None], None),
        (1, 2, ["A", "B"], 1), (1, 3, ["A", None], None), (2, 3, ["A", None], None)]
    assert lineage["usage"]["completion_tokens"] == 4 * 6 + 12 * 9  # the responses and every verdict

    rejects = [json.loads(line) for line in rejects_path(tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert all(r["stage"] == "preferences" for r in rejects)
    assert Counter(r["reason"] for r in rejects) == Counter({
        "verdict unparseable": 3,  # [s=?] shown as A
        "no response beat another in both orders": 2,  # Tie: all ties; Close: the judge always says A
        "teacher error": 1, "reply hit the length limit": 1, "empty response": 1,
        "fewer than two usable responses": 1,
    })
    unreadable = [r for r in rejects if r["reason"] == "verdict unparseable"]
    assert [r["detail"] for r in unreadable] == [
        f"task good, instance 0, response 3 (A) vs {other} (B): verdict names none of A, B, tie: 'Verdict: A or B'"
        for other in (0, 1, 2)]
    assert unreadable[0]["raw"] == "Rationale: hard to say.\nVerdict: A or B"
    close = [r for r in rejects if r["detail"].startswith("task close")]
    assert close[0]["detail"] == (
        "task close, instance 0: verdicts [0-1: A/A, 0-2: A/A, 0-3: A/A, 1-2: A/A, 1-3: A/A, 2-3: A/A]")

    before = [(tmp_path / name).read_text() for name in ("pairs.jsonl", "pairs.rejects.jsonl")]
    again = run_pairwise(tmp_path)
    assert again.stats.requests_sent == 1  # the failed response only: everything else is cached
    assert [(tmp_path / name).read_text() for name in ("pairs.jsonl", "pairs.rejects.jsonl")] == before

    from datagen.config_file import load_config
    from datagen.export import run_export

    run_export(load_config(), tmp_path / "pairs.jsonl", "preferences", tmp_path / "prefs")
    card = (tmp_path / "prefs" / "README.md").read_text()
    assert "1 pairs were judged pairwise (wins in both orders, no 1-10 score; `judging: pairwise`)." in card
    assert "not rated (chosen by responder" not in card


# ---------------------------------------------------------------- the judge's token budget


class LongWinded(SampledScript):
    """SampledScript whose judge writes a 200-word rationale before its `Rating:` line and,
    like a real server, stops at the request's max_tokens (a word a token here)."""

    def generate(self, requests, on_result):
        def budgeted(index, completion):
            request = requests[index]
            if request.messages[-1][1].startswith("You are rating") and completion.text.startswith("Rationale:"):
                words = ("Rationale: " + "because " * 200 + "\n" + completion.text.split("\n")[-1]).split(" ")
                cut = len(words) > request.params.max_tokens
                completion = Completion(" ".join(words[: request.params.max_tokens]), "length" if cut else "stop",
                                        50, min(len(words), request.params.max_tokens))
            on_result(index, completion)

        super().generate(requests, budgeted)


def test_the_default_judge_budget_leaves_room_for_the_rationale_before_the_rating(tmp_path):
    teacher = Teacher(LongWinded(), TeacherConfig(cache_dir=str(tmp_path / "cache")))
    with TaskSink(tmp_path / "pairs.jsonl", PreferencePair) as sink:
        run_preferences(SEEDS[:1], SETTINGS, RunContext(teacher, sink, num=1, seed=7))
    [pair] = list(read_records(tmp_path / "pairs.jsonl", PreferencePair))
    assert pair.score_chosen == 9.0 and pair.lineage.sampling["max_tokens"] == 320

    tight = SETTINGS.model_copy(update={"judge_sampling": SamplingParams(temperature=0.0, max_tokens=160)})
    with TaskSink(tmp_path / "tight.jsonl", PreferencePair) as sink:
        tight_teacher = Teacher(LongWinded(), TeacherConfig(cache_dir=str(tmp_path / "cache")))
        run_preferences(SEEDS[:1], tight, RunContext(tight_teacher, sink, num=1, seed=7))
    rejects = [json.loads(line) for line in rejects_path(tmp_path / "tight.jsonl").read_text().splitlines()]
    assert [r["detail"] for r in rejects if r["reason"] == "rating unparseable"][0] == (
        'task good, instance 0, response 0 (warm): no "Rating: N" line (the reply was cut off at max_tokens 160)')


# ---------------------------------------------------------------- judging: ultrafeedback


def test_ultrafeedback_prompt_is_pinned():
    [message] = ultrafeedback_messages([{"role": "user", "content": "Add 2 and 3."}], [" 5 ", "It is 5."])
    assert message == {"role": "user", "content": (
        "You are rating 2 AI assistants' responses to the same user request.\n"
        "\n"
        "Rate every response on each of four aspects, from 1 (worst) to 5 (best):\n"
        "- Helpfulness: is it correct, informative and useful for the request?\n"
        "- Honesty: does it express uncertainty where it should instead of inventing an answer?\n"
        "- Instruction following: does it meet every requirement of the request, including format and length?\n"
        "- Truthfulness: is it free of factual errors, contradictions and made-up details?\n"
        "\n"
        "Rate each response on its own merits; the order in which they appear means nothing.\n"
        "\n"
        "Request:\n"
        "Add 2 and 3.\n"
        "\n"
        "Response 1:\n"
        "5\n"
        "\n"
        "Response 2:\n"
        "It is 5.\n"
        "\n"
        "Reply with one line per response, in exactly this form:\n"
        "Response 1: helpfulness <1-5>, honesty <1-5>, instruction following <1-5>, truthfulness <1-5>. "
        "Rationale: <one sentence>\n"
        "Response 2: helpfulness <1-5>, honesty <1-5>, instruction following <1-5>, truthfulness <1-5>. "
        "Rationale: <one sentence>")}


def test_ultrafeedback_replies_parse():
    reply = ("Response 1: helpfulness 4, honesty 5, instruction following 3, truthfulness 4. Rationale: fine.\n"
             "**Response 2:** Helpfulness: 2/5, Honesty: 3, Instruction-following: 1, Truthfulness: 2. rationale: no\n"
             "Response 3: helpfulness 6, honesty 5, instruction following 3, truthfulness 4.\n"
             "Response 4: helpfulness 4, honesty 5")
    aspects = dict(zip(ASPECTS, (4, 5, 3, 4)))
    assert parse_aspect_ratings(reply, 5) == [
        Rating(4.0, "fine.", aspects), Rating(2.0, "no", dict(zip(ASPECTS, (2, 3, 1, 2)))),
        "response 3: helpfulness 6 outside 1-5", "response 4: no instruction following, truthfulness",
        'no "Response 5: helpfulness N, ..." line']


class AspectScript(SampledScript):
    """SampledScript's responders with an ultrafeedback judge: each `[s=N]` reply gets
    helpfulness, instruction following and truthfulness round(N/2) and honesty one more
    (capped at 5); the `[s=?]` reply gets no line."""

    @staticmethod
    def answer(prompt: str, seed: int, temperature: float) -> Completion:
        if not re.match(r"You are rating \d+ AI assistants'", prompt):
            return SampledScript.answer(prompt, seed, temperature)
        shown = re.findall(r"\nResponse (\d+):\n(.*?)(?=\n\n)", prompt.split("\nReply with one line", 1)[0] + "\n",
                           flags=re.S)
        lines = []
        for number, text in shown:
            score = re.search(r"\[s=([\d.?]+)\]", text).group(1)
            if score != "?":
                v = max(1, min(5, round(float(score) / 2)))
                lines.append(f"Response {number}: helpfulness {v}, honesty {min(5, v + 1)}, instruction following "
                             f"{v}, truthfulness {v}. Rationale: looks like {score}.")
        return Completion("\n".join(lines), "stop", 200, 40)


def test_ultrafeedback_judging_rates_the_replies_of_a_prompt_together(tmp_path):
    settings = SETTINGS.model_copy(update={"judging": "ultrafeedback", "rejected_pick": "lowest"})
    teacher = Teacher(AspectScript(), TeacherConfig(cache_dir=str(tmp_path / "cache")))
    with TaskSink(tmp_path / "pairs.jsonl", PreferencePair) as sink:
        run_preferences(SEEDS, settings, RunContext(teacher, sink, num=10, seed=7))
    # 16 replies; one judge request for each prompt with two usable replies or more (not Faults)
    assert teacher.stats.requests_sent == 16 + 3
    pairs = {p.task_id: p for p in read_records(tmp_path / "pairs.jsonl", PreferencePair)}
    assert set(pairs) == {"good", "close"}
    good = pairs["good"]
    # warm 0 [s=9] -> 4,5,4,4; hot 0 [s=6] -> 3,4,3,3; warm 1 [s=3] -> 2,3,2,2; hot 1 [s=?] unreadable
    assert good.chosen[0]["content"] == "Good answer warm 0 [s=9]" and good.rejected[0]["content"] == \
        "Good answer warm 1 [s=3]"
    assert (good.score_chosen, good.score_rejected, good.rationale_chosen) == (4.25, 2.25, "looks like 9.")
    lineage = json.loads([line for line in (tmp_path / "pairs.jsonl").read_text().splitlines()
                          if '"task_id":"good"' in line.replace(" ", "")][0])["lineage"]
    assert (lineage["judging"], lineage["operation"]) == ("ultrafeedback", "preferences:ultrafeedback")
    assert lineage["template"] == "preference_ultrafeedback.jinja" and lineage["sampling"]["max_tokens"] == 64 + 96 * 4
    assert [c["score"] for c in lineage["candidates"]] == [4.25, 3.25, 2.25, None]
    assert lineage["candidates"][0]["aspects"] == dict(zip(ASPECTS, (4, 5, 4, 4)))
    assert lineage["usage"]["completion_tokens"] == 4 * 6 + 40  # the replies and one judge reply
    # Close: three replies tie at 4.25 above a 3.25 one; the seeded draw picks among the three
    assert pairs["close"].rejected[0]["content"] == "Close answer hot 0 [s=6.5]"
    assert pairs["close"].chosen[0]["content"] in {"Close answer warm 0 [s=7]", "Close answer warm 1 [s=7]",
                                                   "Close answer hot 1 [s=7]"}
    rejects = [json.loads(line) for line in rejects_path(tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in rejects) == Counter({
        "rating unparseable": 1, "all responses rated the same": 1, "teacher error": 1,
        "reply hit the length limit": 1, "empty response": 1, "fewer than two rated responses": 1})
    [unreadable] = [r for r in rejects if r["reason"] == "rating unparseable"]
    assert unreadable["detail"] == 'task good, instance 0, response 3 (hot): no "Response 4: helpfulness N, ..." line'


# ---------------------------------------------------------------- responders' own teachers: summary, --estimate


def test_responders_with_their_own_backend_count_in_the_summary_and_the_estimate(tmp_path):
    from datagen.config_file import load_config
    from datagen.estimate import format_estimate, run_estimate
    from datagen.generate import format_summary, run_generate
    from datagen.io import write_jsonl_atomic
    from datagen.teachers.teacher import PriceTable

    seeds = tmp_path / "seeds.jsonl"
    write_jsonl_atomic(seeds, SEEDS)
    hot_prices = PriceTable(input_per_million=1.0, output_per_million=2.0)
    hot = Responder(name="hot", sampling={"temperature": 1.2}, teacher=TeacherConfig(model="hot", prices=hot_prices))
    config = load_config()
    config.teacher = TeacherConfig(cache_dir=str(tmp_path / "cache"),
                                   prices=PriceTable(input_per_million=10.0, output_per_million=20.0))
    config.generate = config.generate.model_copy(update={
        "method": "preferences", "seeds": str(seeds), "out": str(tmp_path / "pairs.jsonl"), "num": 10, "seed": 7,
        "preferences": SETTINGS.model_copy(update={"responders": [Responder(name="warm"), hot]})})
    opened = []

    def open_responder(name, responder_config):
        opened.append((name, responder_config.model, responder_config.cache_dir))
        return Teacher(SampledScript(), responder_config)

    # --estimate, a pilot of one pair (task good: 2 warm + 2 hot replies, 4 ratings), projected to 10
    estimate = run_estimate(config, pilot=1, teacher_factory=lambda: Teacher(SampledScript(), config.teacher),
                            other_teacher_factory=open_responder)
    assert opened == [("hot", "hot", str(tmp_path / "cache"))]  # caching where the run's teacher caches
    assert estimate["pilot_requests"] == 8 and estimate["requests"] == 80
    assert estimate["responders"]["hot"]["requests"] == 20 and estimate["teacher"]["requests"] == 60
    # replies: 10 prompt + 6 completion tokens; ratings 50 + 8 ("[s=?]"'s unreadable one: 50 + 5)
    assert estimate["prompt_tokens"] == 10 * (4 * 10 + 4 * 50)
    assert estimate["completion_tokens"] == 10 * (4 * 6 + 3 * 8 + 5)
    hot_cost, judge_cost = (200 * 1 + 120 * 2) / 1e6, (10 * (2 * 10 + 4 * 50) * 10 + 10 * (2 * 6 + 29) * 20) / 1e6
    assert estimate["cost"] == pytest.approx(hot_cost + judge_cost)
    text = format_estimate(estimate)
    assert "requests: 80\n" in text
    assert "  of which responder hot (scripted:prefs): 20 requests, 200 prompt + 120 completion tokens, cost" in text

    summary = run_generate(config, "test", lambda: Teacher(SampledScript(), config.teacher), open_responder)
    # the judge and warm: 8 replies + 13 ratings, 6 of them cached by the pilot; hot: 8 replies, 2 cached
    assert (summary["requests_sent"], summary["cache_hits"]) == (21 - 6, 6)
    hot_counts = summary["responders"]["hot"]
    assert (hot_counts["backend"], hot_counts["model"]) == ("scripted", "prefs")
    assert (hot_counts["requests_sent"], hot_counts["cache_hits"], hot_counts["failures"]) == (6, 2, 0)
    assert (hot_counts["prompt_tokens"], hot_counts["completion_tokens"]) == (60, 36)
    assert hot_counts["cost"] == pytest.approx((60 * 1 + 36 * 2) / 1e6)
    total = summary["all_teachers"]
    assert total["requests_sent"] == 15 + 6 and total["cache_hits"] == 8 and total["unpriced"] == []
    assert total["cost"] == pytest.approx(summary["cost"] + hot_counts["cost"])
    assert "responder hot scripted:prefs: 6 requests, 2 cache hits, 0 failures; tokens 60 prompt + 36 completion" \
        in format_summary(summary)
    assert "all teachers: 21 requests, 8 cache hits" in format_summary(summary)


# ---------------------------------------------------------------- engine: ray


@pytest.mark.slow
def test_preferences_on_ray_look_ahead_and_write_what_local_writes(tmp_path):
    """On engine: ray the loop answers a window of batches ahead, one pipeline per stage, then
    runs local's batches from the cache: pairs and rejects byte for byte local's."""
    import os
    import sys

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    from datagen.engines.config import EngineConfig
    from datagen.engines.ray_teacher import ray_teacher

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run(tmp_path / "local", SampledScript())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = TeacherConfig(model="prefs", cache_dir=str(tmp_path / "ray" / "cache"))
        engine = EngineConfig(kind="ray", replicas=2, batch_size=2)  # a window of 4 prompts: both batches
        with ray_teacher(config, engine, lambda _config: SampledScript(), name="scripted") as teacher:
            with TaskSink(tmp_path / "ray" / "pairs.jsonl", PreferencePair) as sink:
                run_preferences(SEEDS, SETTINGS, RunContext(teacher, sink, num=10, seed=7, lookahead=4))
            pipelines, sent = teacher.backend.pipelines, teacher.stats.requests_sent
    finally:
        ray.shutdown()
    for name in ("pairs.jsonl", "pairs.rejects.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    # ahead: each responder's replies, then the ratings (3 pipelines); the batches then read
    # the cache, but for the failed reply (failures are not cached), asked again in its batch
    assert pipelines == 3 + 1 and sent == 29 + 1
