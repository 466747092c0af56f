"""Built-in quantization plugin of compress-core (``quantization`` entry point).

Methods: ``ptq``, ``qat``, ``lsq``, ``lsq_plus``, ``dorefa``, ``bnn`` (see docs/quantization.md);
the quantization defaults per module type.
"""
