"""The exceptions and warnings of compress-core.

Every error raised on purpose is a :class:`CompressError`, and carries its data as
attributes as well as in its text, so that callers and tests can inspect it.
"""

from __future__ import annotations

__all__ = ["CompressError", "ConfigError", "ConfigWarning", "PluginError", "UnknownMethodError"]


class CompressError(Exception):
    """Root of every error compress-core raises on purpose."""


class ConfigError(CompressError, ValueError):
    """A config list (or method parameters) is invalid.

    Always raised before the model is touched.

    :ivar entry: index of the config entry in the config list, or ``None`` for method parameters.
    :ivar key: dotted path of the offending key inside the entry (``target_settings.weight.sparse_ratio``).
    :ivar module: name of the module the problem was found on, when known.
    :ivar reason: the message without its location prefix.
    """

    def __init__(
        self,
        reason: str,
        *,
        entry: int | None = None,
        key: str | None = None,
        module: str | None = None,
    ) -> None:
        self.reason = reason
        self.entry = entry
        self.key = key
        self.module = module
        super().__init__(self._format())

    def _format(self) -> str:
        where = "config_list" if self.entry is None and self.key is None else ""
        if self.entry is not None:
            where = f"config_list[{self.entry}]"
        if self.key:
            where = f"{where}.{self.key}" if where else self.key
        on = f" (module '{self.module}')" if self.module is not None else ""
        return f"{where}{on}: {self.reason}" if where else f"{self.reason}{on}"


class PluginError(CompressError):
    """A plugin failed to load or registered something invalid.

    :ivar plugin: the entry-point (plugin) name.
    :ivar distribution: ``"name version"`` of the distribution that declared it, when known.
    """

    def __init__(self, message: str, *, plugin: str | None = None, distribution: str | None = None):
        self.plugin = plugin
        self.distribution = distribution
        super().__init__(message)


class UnknownMethodError(CompressError, KeyError):
    """No registered method has the requested name."""

    def __init__(self, method: str, registered: list[str], broken: list[str] | None = None) -> None:
        self.method = method
        self.registered = registered
        self.broken = broken or []
        super().__init__(method)

    def __str__(self) -> str:
        known = ", ".join(self.registered) or "none"
        text = (
            f"unknown method '{self.method}' (registered: {known}); "
            "is its plugin installed? run 'compress plugins'"
        )
        for problem in self.broken:
            text += f"\n  {problem}"
        return text


class ConfigWarning(UserWarning):
    """A config entry has no effect somewhere (an unknown module name, a target configured twice)."""


def warn_config(message: str) -> None:
    """Emit a :class:`ConfigWarning` attributed to the first caller outside compress-core."""
    import os
    import sys
    import types
    import warnings

    package_dir = os.path.dirname(os.path.abspath(__file__))
    level = 1
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir):
        frame = frame.f_back
        level += 1
    warnings.warn(message, ConfigWarning, stacklevel=level)
