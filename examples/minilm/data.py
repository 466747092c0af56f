"""Data and evaluation of ``examples/minilm/run.yaml``: real sentences of Python's own docs.

Sentences come from ``pydoc_data.topics`` (the stdlib's help texts), split at sentence ends and
kept when 40..200 characters long, in a fixed shuffled order; ``eval_size`` are held out. The
label of every sentence is the embedding the *original* model gives it, so the evaluation
measures how closely the compressed model reproduces the original.
"""

from __future__ import annotations

import re

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["cosine_similarity", "load", "sentences"]


def sentences() -> list[str]:
    from pydoc_data.topics import topics

    found: set[str] = set()
    for text in topics.values():
        for part in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
            part = " ".join(part.split())
            if 40 <= len(part) <= 200:
                found.add(part)
    return sorted(found)


def load(
    batch_size: int = 32,
    train_size: int = 512,
    eval_size: int = 256,
    max_length: int = 48,
    layers: int | None = None,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """``(train, eval)`` loaders of ``(token ids [B, max_length], original embeddings [B, 384])``.

    ``train`` is what the recovery step regresses (the original's embeddings, the labels, with
    ``loss: cosine``) and what calibrates the quantizer.
    :param layers: must equal the model factory's ``layers`` (the labels come from that model).
    """
    from transformers import AutoTokenizer

    build, model_path = _model_module().build, _model_module().model_path
    texts = sentences()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [texts[i] for i in order[: eval_size + train_size]]
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    ids = tokenizer(
        picked, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )["input_ids"]
    original = build(layers)
    with torch.no_grad():
        labels = torch.cat([original(chunk) for chunk in ids.split(64)])
    evaluation = DataLoader(TensorDataset(ids[:eval_size], labels[:eval_size]), batch_size=64)
    train = DataLoader(
        TensorDataset(ids[eval_size:], labels[eval_size:]), batch_size=batch_size, shuffle=False
    )
    return train, evaluation


def _model_module():
    # run.yaml names this file by path, so it is not part of a package: load the sibling the
    # same way (once; the runner keys file modules by path too).
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).with_name("model.py")
    name = f"_compress_example_minilm_model_{abs(hash(str(path)))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def cosine_similarity(model, batches) -> float:
    """Mean cosine similarity (in percent) of ``model``'s embeddings to the original's."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, original in batches:
            got = model(ids)
            total += float(torch.nn.functional.cosine_similarity(got, original, dim=-1).sum())
            count += len(ids)
    return 100.0 * total / max(count, 1)
