"""LoRA / QLoRA SFT, merge and evaluation of a student (imported as `datagen.finetune`).

This folder is mapped into the package at build time; it is never a top-level name.
"""
