"""Glue between compressors and training frameworks that own the loop.

Each submodule imports its framework lazily; ``import compress_core`` never pulls them in.
"""
