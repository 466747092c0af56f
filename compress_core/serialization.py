"""Saving a sped-up model without pickle, and rebuilding it from the original class.

:func:`save_pruned` writes a folder with ``model.safetensors`` (the weights) and
``pruned.json`` (which entries of which tensors each replaced module kept, and which biases
speedup added when folding constants). :func:`load_pruned` replays the same shrinking on a
freshly constructed model of the original class, through the same replacers, and loads the
weights; no code is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .speedup import SpeedupError, apply_replacements

__all__ = ["load_pruned", "save_pruned"]

FORMAT = "compress_core.pruned/1"
WEIGHTS = "model.safetensors"
SPEC = "pruned.json"


def save_pruned(model: nn.Module, path: str | Path) -> Path:
    """Save a model returned by :func:`compress_core.speedup` to the folder ``path``.

    :return: the folder.
    :raises SpeedupError: ``model`` did not come from speedup.
    """
    record = model.__dict__.get("_compress_pruned")
    if record is None:
        raise SpeedupError(
            "save_pruned needs a model returned by compress_core.speedup (it records what shrank)"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    spec = {
        "format": FORMAT,
        "modules": record["modules"],
        "added_bias": record["added_bias"],
        "shapes": shapes,
    }
    # save_model handles tensors shared between modules (tied weights), which save_file rejects.
    safetensors.torch.save_model(model, str(folder / WEIGHTS))
    (folder / SPEC).write_text(json.dumps(spec, indent=1, sort_keys=True))
    return folder


def load_pruned(model: nn.Module, path: str | Path, *, host: Any = None) -> nn.Module:
    """Shrink ``model`` (a fresh instance of the original class) as saved, then load the weights.

    ``model`` is modified in place and returned. The saved spec is checked against ``model``
    before anything changes; a mismatch raises without touching it.

    :raises SpeedupError: the folder is not a saved pruned model, or does not fit ``model``.
    """
    from .registry import get_host

    folder = Path(path)
    try:
        spec = json.loads((folder / SPEC).read_text())
    except (OSError, ValueError) as exc:
        raise SpeedupError(
            f"{folder}: not a saved pruned model ({type(exc).__name__}: {exc})"
        ) from exc
    if spec.get("format") != FORMAT:
        raise SpeedupError(
            f"{folder / SPEC}: unknown format {spec.get('format')!r}, expected {FORMAT!r}"
        )
    modules = dict(model.named_modules())
    keeps: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensors in spec["modules"].items():
        module = modules.get(name)
        if module is None:
            raise SpeedupError(
                f"{folder / SPEC} names module '{name}', which the model does not have", module=name
            )
        keeps[name] = {}
        for tensor_name, dims in tensors.items():
            tensor = getattr(module, tensor_name, None)
            if not isinstance(tensor, torch.Tensor):
                raise SpeedupError(f"module '{name}' has no tensor '{tensor_name}'", module=name)
            keeps[name][tensor_name] = {}
            for dim, kept in dims.items():
                d = int(dim)
                mask = torch.zeros(tensor.shape[d], dtype=torch.bool)
                if kept and max(kept) >= tensor.shape[d]:
                    raise SpeedupError(
                        f"module '{name}' tensor '{tensor_name}' has {tensor.shape[d]} entries on dim {d}, "
                        f"the saved model kept index {max(kept)}: is this the model class it was pruned from?",
                        module=name,
                    )
                mask[kept] = True
                keeps[name][tensor_name][d] = mask
    for name in spec["added_bias"]:
        if name not in modules or not hasattr(modules[name], "bias"):
            raise SpeedupError(
                f"{folder / SPEC}: module '{name}' should get a bias but has no 'bias'", module=name
            )
    apply_replacements(model, keeps, get_host() if host is None else host)
    for name in spec["added_bias"]:
        module = model.get_submodule(name)
        if module.bias is None:
            out = module.weight.shape[1 if getattr(module, "transposed", False) else 0]
            module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype))
    missing, unexpected = safetensors.torch.load_model(model, str(folder / WEIGHTS), strict=True)
    if missing or unexpected:
        raise SpeedupError(f"{folder / WEIGHTS}: missing {missing}, unexpected {unexpected}")
    model.__dict__["_compress_pruned"] = {
        "modules": spec["modules"],
        "added_bias": spec["added_bias"],
    }
    return model
