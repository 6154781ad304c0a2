"""The tiny_capitals task's dataset: data.jsonl beside this file (no hub)."""

from pathlib import Path

import datasets


def load_local(**_metadata) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.load_dataset(
        "json", data_files=str(Path(__file__).with_name("data.jsonl")), split="train")})
