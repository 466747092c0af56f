"""Built-in distillation plugin of compress-core (``distillation`` entry point).

Today it supplies the distillation default (``_output_`` of any module); the methods
(dynamic_layerwise, adaptive1d_layerwise) are registered here as they land.
"""
