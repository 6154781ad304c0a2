"""LoRA / QLoRA SFT and DPO, merge and evaluation of a student (imported as `datagen.finetune`).

Components (each usable on its own):

    config        the finetune: and dpo: sections (a shared adapter/optimiser base)
    data, pairs   conversations and preference pairs into token ids, labels and batches
    model         device, precision, loading the student with a LoRA adapter, merging it
    losses        SFT's and DPO's losses and the start-up checks that pick their path
    optim         optimiser, schedule, gradient accumulation, clipping, loss scaling
    checkpoints   fingerprint, save, find and restore (adapter, optimiser, RNG per rank)
    distributed   torchrun's ranks, DDP / FSDP2 wrapping, each rank's share of a step
    run           TrainingRun: one run's ranks, resume, wrapping, optimiser, log, save, merge

Recipes: `sft` and `dpo` (a step loop over a TrainingRun), `evaluate` and `dpo_eval`
(`datagen eval`), `launch` (`datagen finetune`: settings, and torchrun for several processes).

This folder is mapped into the package at build time; it is never a top-level name.
"""
