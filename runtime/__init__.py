"""Torch-free runtime (import name ``diffgap.runtime``): onnxruntime and TensorRT sessions behind one
interface, the engine builder, and the Pipeline API. Imports only numpy, onnxruntime / tensorrt+pycuda
(lazily, when a session of that backend is created), and the torch-free contract modules
``diffgap.core.iospec``, ``diffgap.core.manifest``, ``diffgap.core.fsutil`` (plus ``diffgap.core.tokenizer`` /
``diffgap.core.audio`` when raw text / audio files are given, and ``diffgap.core.data`` in ``diffgap index``).

Modules:

- :mod:`.session`   ``open_model(export_dir, name, backend, precision)`` / ``load(path)`` ->
  a :class:`Session` with ``.io``, ``.inputs``, ``.outputs`` and ``infer(dict) -> dict``;
- :mod:`.interface` the ``Session`` interface every backend implements;
- :mod:`.trt_session` the TensorRT backend (pycuda, page-locked buffers, optional CUDA graphs, one
  execution context per captured batch size);
- :mod:`.gpu_libs`  loads pip's CUDA / cuDNN / TensorRT libraries for onnxruntime's GPU providers;
- :mod:`.engine`    ``build_engines`` / ``find_engine`` and the engine cache;
- :mod:`.pipeline`  ``TextToAudioBridge``, ``AudioToTextBridge``, ``VideoToAudioBridge``,
  ``AudioToVideoBridge``, ``make_noise``;
- :mod:`.gallery`, :mod:`.gallery_build`, :mod:`.search`, :mod:`.search_engines`, :mod:`.fusion`:
  the gallery index directory, ``build_index``, ``AudioSearch`` and the search engines (``exact``,
  ``faiss-hnsw``, ``faiss-ivf``, ``milvus``; FAISS and pymilvus are imported only by their engines);
- ``cli_build_engines``, ``cli_index``, ``cli_search``: the ``diffgap`` subcommands.
"""
from .fusion import fuse_scores, top_k
from .gallery import GalleryIndex, SearchError
from .gallery_build import build_index
from .pipeline import AudioToTextBridge, AudioToVideoBridge, BridgeResult, TextToAudioBridge, VideoToAudioBridge, make_noise
from .search import AudioSearch, GallerySearcher
from .search_engines import KNOBS as SEARCH_KNOBS
from .session import BACKENDS, PRECISIONS, OrtSession, Session, load, open_model

__all__ = [
    "AudioSearch", "GallerySearcher", "SearchError", "SEARCH_KNOBS", "AudioToTextBridge", "AudioToVideoBridge", "VideoToAudioBridge", "BridgeResult", "GalleryIndex", "TextToAudioBridge", "build_index",
    "fuse_scores", "make_noise", "top_k", "BACKENDS", "PRECISIONS", "OrtSession", "Session", "load", "open_model",
]
