"""compress-core: PyTorch model compression driven by one config language.

Importing this package does not import any plugin; plugins load on the first method lookup.
"""

from __future__ import annotations

from .canonical import TargetRecord, canonicalize
from .compressor import Compressor
from .config import AlignSetting, DistillationSetting, PruningSetting, QuantizationSetting
from .errors import CompressError, ConfigError, ConfigWarning, PluginError, UnknownMethodError
from .hookspecs import hookimpl
from .orchestrator import Orchestrator, create, list_methods
from .pruner import Pruner
from .registry import PluginHost, PluginRegistry, PluginWarning, get_host
from .wrapper import unwrap

__all__ = [
    "AlignSetting",
    "CompressError",
    "Compressor",
    "ConfigError",
    "ConfigWarning",
    "DistillationSetting",
    "Orchestrator",
    "PluginError",
    "PluginHost",
    "PluginRegistry",
    "PluginWarning",
    "Pruner",
    "PruningSetting",
    "QuantizationSetting",
    "TargetRecord",
    "UnknownMethodError",
    "canonicalize",
    "create",
    "get_host",
    "hookimpl",
    "list_methods",
    "unwrap",
]

__version__ = "0.1.0"
