"""Generators: turn seed tasks into new tasks with a published method.

Each method is one module holding its settings model, its pure prompt/parse functions
and `run(seeds, settings, context)`; `datagen.generate.GENERATORS` registers it under its
CLI name. The shared plumbing (the `RunContext`, output sink, rejects, lineage) is in
`common.py`; `datagen.generate` runs a method from the CLI with progress, resume and a
summary.
"""
