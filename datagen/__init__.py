"""datagen: synthetic instruction data from a teacher model, filtered, exported and distilled.

Use the CLI (`datagen --help`) or the modules directly:

    from datagen.records import Task
    from datagen.teachers import make_teacher

Importing this package is cheap: torch, transformers and vllm load only inside the
teacher backends that need them.
"""

__version__ = "0.1.0"
