"""Built-in distillation plugin of compress-core (``distillation`` entry point).

Methods ``dynamic_layerwise`` and ``adaptive1d_layerwise`` (NNI's class names as aliases), and
the distillation default: ``_output_`` of any module. See ``docs/distillation.md``.
"""
