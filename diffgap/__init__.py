"""DiffGAP: lightweight conditional diffusion inside a contrastive embedding space (CLAP / CAVP).

``import diffgap`` is torch-free: the torch-dependent modules (``diffgap.models``,
``diffgap.diffusion``, ``diffgap.train`` ...) are imported explicitly by whoever needs them.
"""
__version__ = "0.1.0"
