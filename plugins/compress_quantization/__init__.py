"""Built-in quantization plugin of compress-core (``quantization`` entry point).

Today it supplies the quantization defaults per module type; the methods (ptq, qat, lsq, ...)
are registered here as they land.
"""
