"""diffgap benchmarks: every backend side by side, against this machine's measured roofline.

Run from the repository root (this folder is not part of the installed package)::

    python -m benchmarks --out benchmarks/results          # what `make bench` runs
    python -m benchmarks --quick --out "$(mktemp -d)"      # tiny sizes (what the smoke test runs)
    python -m benchmarks --only denoiser,roofline          # a subset of the groups

Groups (``--only``):

* ``roofline``  -- this machine's sgemm peak and memory bandwidth (always measured: the denoiser rows
  need it for their bound).
* ``denoiser``  -- the fused K-step sampler at K x B: PyTorch eager step loop, ``torch.compile``,
  ORT fused FP32, ORT fused FP16 graph, TensorRT FP16 (+ CUDA graph) where a GPU is present; FLOPs,
  bytes moved, roofline bound and achieved fraction per row.
* ``encoders``  -- CLAP text and audio encoders (ORT FP32 / FP16) at B in {1, 8}.
* ``pipeline``  -- the end-to-end in-process Pipeline (text -> bridged embedding).
* ``triton``    -- Triton ensembles over HTTP and gRPC at concurrency 1, 2, 4, 8 with perf_analyzer.
* ``knobs``     -- what was tried where a goal is missed (ORT threads, graph optimisation level,
  IO binding).
* ``search``    -- gallery search engines (exact, FAISS HNSW / IVF, Milvus Lite) on synthetic gallery
  vectors at N = 10k, 100k, 200k, 1M (``--search-sizes``; 1k, 4k with ``--quick``), and
  ``AudioSearch`` end to end at 100k: build time, disk and resident bytes, p50/p99 at B = 1 and 16,
  queries/s, recall@10, the exact engine's bandwidth bound.
* ``lean``      -- fusion weights with both bridged terms at 0: index bytes and query latency with
  the zero-weight terms skipped (head-only queries, D-wide index) and computed (sampler per query,
  E + 2D-wide index), same run, same scores; N = 100k (2k with ``--quick``).
* ``generation`` -- the bridge's cost against one generation: the fused raw-space generation sampler
  (K as shipped) vs the denoising loop of an AudioLDM-small-size UNet (published config, random
  weights, the pipeline's shipped steps and guidance), same run, same machine.
* ``train-step`` -- one training step of the default preset (random weights and embeddings), the
  denoisers' stage and the heads' stage, each with torch's per-tensor AdamW loop + a per-parameter
  EMA loop against the package's fused AdamW + multi-tensor EMA, taking turns step by step: median
  and p90 ms per step, steps/s, their ratio, the torch thread count.

Outputs (written atomically): ``<out>/<host>-<date>.json``, ``<out>/<host>-<date>.md`` and PNG plots
``<out>/<host>-<date>-*.png``. Weights are random (an untrained model of the preset): timings do not
depend on the weight values.
"""
SCHEMA = "diffgap-bench/1"
GROUPS = ("roofline", "denoiser", "encoders", "pipeline", "triton", "knobs", "search", "lean", "generation", "train-step")
