"""compress-core: PyTorch model compression driven by one config language.

Importing this package does not import any plugin; plugins load on the first method lookup.
"""

from __future__ import annotations

from .canonical import TargetRecord, canonicalize
from .compressor import Compressor
from .config import AlignSetting, DistillationSetting, PruningSetting, QuantizationSetting
from .dependency import auto_set_dependency_group_ids
from .errors import CompressError, ConfigError, ConfigWarning, PluginError, UnknownMethodError
from .export import ExportError, export_onnx, load_quantized, save_quantized
from .hookspecs import hookimpl
from .orchestrator import Orchestrator, create, list_methods
from .pruner import Pruner
from .registry import PluginHost, PluginRegistry, PluginWarning, get_host
from .serialization import load_pruned, save_pruned
from .speedup import SpeedupError, SpeedupReport, SpeedupWarning, speedup
from .wrapper import unwrap

__all__ = [
    "AlignSetting",
    "CompressError",
    "Compressor",
    "ConfigError",
    "ConfigWarning",
    "DistillationSetting",
    "ExportError",
    "Orchestrator",
    "PluginError",
    "PluginHost",
    "PluginRegistry",
    "PluginWarning",
    "Pruner",
    "PruningSetting",
    "QuantizationSetting",
    "SpeedupError",
    "SpeedupReport",
    "SpeedupWarning",
    "TargetRecord",
    "UnknownMethodError",
    "auto_set_dependency_group_ids",
    "canonicalize",
    "create",
    "export_onnx",
    "get_host",
    "hookimpl",
    "list_methods",
    "load_pruned",
    "load_quantized",
    "save_pruned",
    "save_quantized",
    "speedup",
    "unwrap",
]

__version__ = "0.1.0"
