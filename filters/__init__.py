"""Filters and dedup passes over task records (imported as `datagen.filters`).

This folder is mapped into the package at build time; it is never a top-level name.
"""
