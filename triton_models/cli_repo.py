"""``diffgap triton-repo EXPORT_DIR --flavor gpu|portable --out DIR``: write a Triton model repository."""
from __future__ import annotations

import argparse

from diffgap.core.names import PRECISIONS

HELP = "write a Triton model repository (encoders, samplers, tokenizer, ensembles) for an export dir"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", help="export directory made by `diffgap export` (manifest.json)")
    p.add_argument("--out", default="triton_repo", help="repository directory to write (default: %(default)s)")
    p.add_argument("--flavor", choices=("portable", "gpu"), default="portable",
                   help="portable: python models on onnxruntime CPU (serves anywhere, the default); "
                        "gpu: TensorRT plans on KIND_GPU with dynamic batching and CUDA graphs")
    p.add_argument("--index", help="gallery index (`diffgap index`) to ship with the text_to_audio_search ensemble")
    p.add_argument("--top-k", type=int, default=10, help="results per query of text_to_audio_search (default: %(default)s)")
    p.add_argument("--gpu-platform", choices=("tensorrt_plan", "onnxruntime_onnx"), default="tensorrt_plan",
                   help="gpu flavour: prebuilt TensorRT engines (default) or ONNX on onnxruntime with the TensorRT accelerator")
    p.add_argument("--server-trt-version", metavar="X.Y.Z",
                   help="gpu flavour with tensorrt_plan (required): the TensorRT release inside the tritonserver image that "
                        "will serve the repository; engines built by another release are refused. Read it with "
                        "`docker run --rm nvcr.io/nvidia/tritonserver:<yy.mm>-py3 sh -c 'dpkg -l | grep nvinfer'`")
    p.add_argument("--ort-trt-cache-dir", default=None, metavar="DIR",
                   help="gpu flavour with onnxruntime_onnx: an existing folder inside the server under which each model's "
                        "TensorRT engine cache gets its own folder diffgap_ort_trt_<model> (default: /tmp)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16", help="gpu flavour: which graphs/engines (default: %(default)s)")
    p.add_argument("--engine-dir", help="gpu flavour: engine cache of `diffgap build-engines` (default: EXPORT_DIR/engines)")
    p.add_argument("--default-seed", type=int, default=None, help="sampler seed when a request sends none (default: the runtime's)")
    p.add_argument("--instances", type=int, default=1, help="instances per model (default: %(default)s)")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="portable flavour: onnxruntime threads per model instance (default: 0 = one per core)")
    p.add_argument("--queue-delay-us", type=int, default=None,
                   help="dynamic batching window in microseconds (default: 0 portable, 100 gpu)")
    g = p.add_argument_group("generation (the export needs `diffgap export --generation --generator GENERATOR_DIR`)")
    g.add_argument("--generation", action="store_true",
                   help="write the generation repository instead: text_to_audio_condition (caption -> N raw-space condition "
                        "samples), and with --generator the text_to_audio_waveform ensemble")
    g.add_argument("--generator", metavar="DIR", help="local diffusers AudioLDM/MusicLDM folder served as the audio_generator "
                                                      "model (torch; named in its config.pbtxt, not copied)")
    g.add_argument("--samples", type=int, default=1, help="samples per caption when a request sends none (default: %(default)s)")
    g.add_argument("--inference-steps", type=int, help="the generator's denoising steps (default: the pipeline's)")
    g.add_argument("--audio-length", type=float, metavar="SECONDS", help="generated audio length (default: the pipeline's)")
    g.add_argument("--generator-guidance", type=float, help="the generator's guidance scale (default: the pipeline's)")
    g.add_argument("--generator-device", help="torch device of the generator (default: cpu portable, cuda gpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run(args: argparse.Namespace) -> int:
    from diffgap.core.errors import UserError

    from .repository import build_repository, read_repository_info

    opts = dict(
        flavor=args.flavor, index=args.index, top_k=args.top_k, gpu_platform=args.gpu_platform,
        precision=args.precision, engine_dir=args.engine_dir, instances=args.instances,
        queue_delay_us=args.queue_delay_us,
        intra_op_threads=args.intra_op_threads, server_trt_version=args.server_trt_version,
    )
    if args.ort_trt_cache_dir:
        opts["ort_trt_cache_dir"] = args.ort_trt_cache_dir
    if args.default_seed is not None:
        opts["default_seed"] = args.default_seed
    if args.generation:
        from .generation import build_generation_repository

        if args.index:
            raise UserError("--index belongs to the retrieval repository; drop it with --generation")
        opts.pop("index"), opts.pop("top_k")
        gen = dict(samples=args.samples, generator=args.generator, num_inference_steps=args.inference_steps,
                   audio_length_in_s=args.audio_length, generator_guidance=args.generator_guidance, device=args.generator_device)
        out = build_generation_repository(args.export_dir, args.out, overwrite=args.overwrite, **opts, **gen)
    else:
        if args.generator:
            raise UserError("--generator serves a generator in the generation repository: add --generation")
        out = build_repository(args.export_dir, args.out, overwrite=args.overwrite, **opts)
    info = read_repository_info(out)
    print(f"wrote {info['flavor']} Triton repository {out} ({len(info['models'])} models)")
    for name in info["models"]:
        print(f"  {name}")
    print(f"serve it with: diffgap serve {out}")
    return 0
