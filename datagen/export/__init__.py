"""`datagen export`: task JSONL -> Natural-Instructions task files, training files or a HF dataset.

Every format is a view of the same task records, written into one folder with a dataset
card (`README.md`, see `datagen.export.card`) beside the data:

| format | what lands in OUT |
| --- | --- |
| `natural-instructions` | `tasks/taskNNN_<name>.json` (allenai/natural-instructions schema), `tasks/README.md`, `splits/{default,xlingual}/{train,test,excluded}_tasks.txt` |
| `alpaca` | `train.json`, `validation.json`, `test.json`: JSON arrays of `{instruction, input, output}` |
| `messages` | `train.jsonl`, `validation.jsonl`, `test.jsonl`: `{messages, task_id, instance_index}` |
| `prompt-completion` | `train.jsonl`, `validation.jsonl`, `test.jsonl`: `{prompt, completion, system, task_id, instance_index}` |
| `hf` | `dataset/` (`DatasetDict.save_to_disk`) and `data/<split>.parquet`, one typed row per instance, lineage as columns |

Splits are by task (`split_by_task`): no task has instances on both sides. Natural-
Instructions files put each task's first instances (Orca explanations first) into
`Positive Examples` and take `Negative Examples` from the rejects file beside the input
(`raw.jsonl` -> `raw.rejects.jsonl`, and through `kept.stats.json` the rejects of the run
the filter read); a classification task with none shows another of its labels, any other
task gets one from the teacher (`templates/negative_example.jinja`), which is only loaded
when some task needs it. Every view's user turn comes from `datagen.chat`. `--strict`
applies the upstream repository's validation rules (`validate_ni_task`) and exports only
the tasks that pass, naming the rule each other task breaks.

    datagen export kept.jsonl --format natural-instructions --out ni/ --strict
    datagen export kept.jsonl --format messages --out sft/        # sft/train.jsonl

    from datagen.export import chat_examples, run_export, split_by_task

The package, one module per piece:

| module | what it holds |
| --- | --- |
| `config` | `ExportConfig`, the `export:` section |
| `formats` | `split_by_task` and the chat / Alpaca / prompt-completion views and files |
| `natural_instructions` | NI task files, `validate_ni_task` (`--strict`), README and splits |
| `hierarchy`, `categories` | upstream's category / domain / reasoning names; the category of a task |
| `negatives` | negative examples from rejects and from the teacher |
| `languages` | ISO 639 names and the language detector |
| `hf` | the `hf` format's typed rows and `tasks_from_rows` |
| `card` | the dataset card |
| `hub` | `--push-to-hub`: the upload plan (`--dry-run`) and the upload to the Hugging Face Hub |
| `run` | `run_export` and `format_export_summary` |
"""  # noqa: E501 - markdown table rows cannot be wrapped

from datagen.chat import instance_messages
from datagen.export.config import ExportConfig
from datagen.export.formats import SPLITS, alpaca_examples, chat_examples, prompt_completion_examples, split_by_task
from datagen.export.hf import hf_features, hf_rows, tasks_from_rows
from datagen.export.languages import detect_language, iso_language_names
from datagen.export.natural_instructions import ni_task, validate_ni_task
from datagen.export.negatives import negative_prompt, negatives_from_rejects, parse_negative, read_rejects
from datagen.export.run import FORMATS, MANIFEST, format_export_summary, run_export

__all__ = [
    "FORMATS", "MANIFEST", "SPLITS", "ExportConfig", "alpaca_examples", "chat_examples", "detect_language",
    "format_export_summary", "hf_features", "hf_rows", "instance_messages", "iso_language_names",
    "negative_prompt", "negatives_from_rejects", "ni_task", "parse_negative", "prompt_completion_examples",
    "read_rejects", "run_export", "split_by_task", "tasks_from_rows", "validate_ni_task",
]
