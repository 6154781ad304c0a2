"""Prompt templates: jinja2 files in `templates/`, shipped inside the package.

Templates are found through `importlib.resources` (never the working directory), rendered
with StrictUndefined (a missing variable is an error, not an empty string), and
identified in every record's lineage by name and sha256 of the template source.

    from datagen.prompts import load_template
    prompt = load_template("self_instruct_bootstrap.jinja")
    text = prompt.render(instructions=[...])
    prompt.sha256
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Template:
    name: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def render(self, **context: Any) -> str:
        return _compile(self.source).render(**context)


@cache
def load_template(name: str) -> Template:
    source = resources.files("datagen.templates").joinpath(name).read_text(encoding="utf-8")
    return Template(name, source)


@cache
def _compile(source: str):
    import jinja2

    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False
    )
    return environment.from_string(source)
