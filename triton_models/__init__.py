"""Triton model-repository templates and python models (import name ``diffgap.triton_models``)."""
