"""Generators: turn seed tasks into new tasks with a published method.

Each method is one module holding its settings model, its pure prompt/parse functions
and its loop; `METHODS` maps the CLI name to that module's entry point. The shared
plumbing (output sink, rejects, lineage) is in `common.py`; `datagen.generate` runs a
method from the CLI with progress, resume and a summary.
"""
