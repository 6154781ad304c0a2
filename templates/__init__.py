"""Jinja2 prompt templates, one file per prompt (imported as `datagen.templates`).

Found through `importlib.resources`, never the working directory:

    from datagen.prompts import render
"""
