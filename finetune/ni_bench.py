"""Super-NaturalInstructions (Wang et al., 2022) in the NI paper's setting, for `datagen eval --benchmark ni`.

The default test split (`splits/default/test_tasks.txt`: 119 English tasks) with the first 100
instances of each task, as the paper's `ni_dataset.py` takes them; the prompt is Tk-Instruct's
(`ni_collator.py`): the task definition alone ("ni", zero-shot) or followed by two positive
examples ("ni-2pos"), then the instance:

    Definition: Two analogies that relate items to ... following the "A : B" relation.

     Positive Example 1 -
    Input: soda : can. water : ?
     Output: bottle.

    Now complete the following example -
    Input: jam : jar. potatoes : ?
    Output:

Scored with the paper's ROUGE-L: `rouge_score`'s rougeL F1 with its Porter stemmer, the best
over an instance's reference outputs, averaged over all instances (x100, as the paper reports).
The student is a chat model, so the prompt goes in as the user turn of its chat template (the
paper fed it to T5 as plain text); generation is greedy, at most 128 new tokens (the paper's
`max_target_length`). Not done here: the paper's 1024-token cut of long prompts (an example that
does not fit is dropped, then the prompt is cut) and the GPT-2-tokenised ROUGE of its
cross-lingual track (the default split is English only).

    examples = ni_examples(NI_SAMPLE, positives=2, instances_per_task=100)
    ni_scores(examples, replies)   # {"rouge_l": 31.2, "per_task": {...}}
"""

from __future__ import annotations

import json
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from datagen.errors import InputError

# A few real test tasks, 5 instances each (README.md there says what was cut and the licence).
NI_SAMPLE = Path(__file__).resolve().parents[1] / "datagen" / "data" / "benchmarks" / "ni_sample"
TEST_SPLIT = Path("splits") / "default" / "test_tasks.txt"
MAX_NEW_TOKENS = 128  # Tk-Instruct's max_target_length


@dataclass(frozen=True)
class NiExample:
    task: str
    prompt: str
    references: tuple[str, ...]


def sample_folder() -> Path:
    """The shipped sample: beside this module in a checkout, under datagen/ when installed."""
    if NI_SAMPLE.is_dir():
        return NI_SAMPLE
    import datagen

    return Path(datagen.__file__).parent / "data" / "benchmarks" / "ni_sample"


def task_files(path: str | Path | None) -> list[Path]:
    """The task files to score: an NI checkout's default test tasks (its `tasks/` folder and
    `splits/default/test_tasks.txt`), every `task*.json` of a task folder (or its `tasks/`,
    as `datagen export --format natural-instructions` writes it), or one task file."""
    root = sample_folder() if path is None else Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"{root}: no such NI checkout, task folder or task file")
    split = root / TEST_SPLIT
    tasks_dir = root / "tasks" if (root / "tasks").is_dir() else root
    if split.is_file():
        names = [line.strip() for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
        files = [tasks_dir / f"{name}.json" for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{split}: {len(missing)} listed tasks are not in {tasks_dir} (first: {missing[0]})")
        return files
    files = sorted(tasks_dir.glob("task*.json"))
    if not files:
        raise InputError(f"{root}: no task*.json files and no {TEST_SPLIT}; expected an NI checkout or task folder")
    return files


def read_task(path: Path) -> dict[str, Any]:
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable NI task file ({error})") from None
    for key in ("Definition", "Instances"):
        if key not in task:
            raise InputError(f"{path}: an NI task file needs {key!r}")
    return task


def _end_sentence(text: str) -> str:
    # Tk-Instruct adds a full stop unless the text already ends in punctuation
    return text if text and text[-1] in string.punctuation else text + "."


def ni_prompt(task: dict[str, Any], instance_input: str, positives: int = 0) -> str:
    """Tk-Instruct's source text: definition, `positives` positive examples, the instance."""
    definition = task["Definition"]
    if isinstance(definition, list):
        definition = definition[0]
    text = _end_sentence("Definition: " + definition.strip()) + "\n\n"
    for number, example in enumerate(task.get("Positive Examples", [])[:positives], start=1):
        text += _end_sentence(f" Positive Example {number} -\nInput: {example['input'].strip()}") + "\n"
        text += _end_sentence(f" Output: {example['output'].strip()}") + "\n\n"
    text += _end_sentence(f"Now complete the following example -\nInput: {instance_input.strip()}") + "\n"
    return text + "Output: "


def ni_examples(path: str | Path | None, *, positives: int = 0, instances_per_task: int = 100,
                max_tasks: int | None = None) -> list[NiExample]:
    """Prompts and references of the first `instances_per_task` instances of each task."""
    examples = []
    for file in task_files(path)[:max_tasks]:
        task = read_task(file)
        for instance in task["Instances"][:instances_per_task]:
            outputs = instance.get("output")
            references = tuple(outputs) if isinstance(outputs, list) else (str(outputs),)
            examples.append(NiExample(file.stem, ni_prompt(task, instance["input"], positives), references))
    if not examples:
        raise InputError(f"{path}: no NI instances to score")
    return examples


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()


@lru_cache(maxsize=65536)
def _stem(token: str) -> str:
    return _stemmer().stem(token)


def stemmed_tokens(text: str) -> list[str]:
    """rouge_score's tokens with `use_stemmer=True`: Porter stems of tokens longer than 3 characters."""
    from datagen.rouge import tokenize

    return [_stem(token) if len(token) > 3 else token for token in tokenize(text)]


def rouge_l(prediction: str, reference: str) -> float:
    """rouge_score's rougeL F1 with the stemmer (the NI evaluation's `default_rouge_scorer`)."""
    from datagen.rouge import f1_from_lcs, lcs_length

    target, predicted = stemmed_tokens(reference), stemmed_tokens(prediction)
    return f1_from_lcs(lcs_length(target, predicted), len(target), len(predicted))


def best_rouge_l(prediction: str, references: Sequence[str]) -> float:
    """The NI evaluation's `metric_max_over_ground_truths`: the best over the references."""
    return max(rouge_l(prediction, reference) for reference in references)


def ni_scores(examples: Sequence[NiExample], replies: Sequence[str]) -> dict[str, Any]:
    """ROUGE-L x100 over all instances, and per task."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for example, reply in zip(examples, replies):
        by_task[example.task].append(best_rouge_l(reply, example.references))
    everything = [score for scores in by_task.values() for score in scores]
    return {"rouge_l": round(100 * sum(everything) / len(everything), 2),
            "per_task": {task: round(100 * sum(s) / len(s), 2) for task, s in by_task.items()}}
