"""`python -m datagen.finetune ARGS`: the same as `datagen finetune ARGS`; the entry point
torchrun starts on every rank.

    torchrun --nproc-per-node 2 -m datagen.finetune out/dataset --out out/student
"""

import sys

from datagen.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]])
