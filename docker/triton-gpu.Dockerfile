# Triton for the gpu flavour of `diffgap triton-repo`: NVIDIA's tritonserver image (TensorRT, onnxruntime
# and python backends) plus what the repository's python models (tokenizer, noise, search, audio decode)
# import: diffgap's torch-free core and runtime with onnxruntime for CPU, as `pip install diffgap[runtime]`.
#
# TensorRT coupling: a `tensorrt_plan` engine loads only in the TensorRT release that built it, and each
# tritonserver release bundles one (read it with `dpkg -l | grep nvinfer` inside the image, or the release
# notes). Either build the engines INSIDE this image (`diffgap build-engines` needs the `tensorrt` python
# package of that same release and pycuda, which this file does not install), or generate the repository
# with `--gpu-platform onnxruntime_onnx`: Triton's onnxruntime backend then builds each engine at load time
# with the image's own TensorRT, caching it under /tmp/diffgap_ort_trt_<model>.
#
#   docker build -f docker/triton-gpu.Dockerfile --build-arg TRITON_RELEASE=25.01 -t diffgap-triton-gpu .
#   diffgap triton-repo EXPORT_DIR --out triton_repo_gpu --flavor gpu --gpu-platform onnxruntime_onnx
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v "$PWD/triton_repo_gpu:/models:ro" diffgap-triton-gpu tritonserver --model-repository=/models
#
# The python models run inside Triton's python backend, whose interpreter is the image's python3: pick a release
# whose python3 is >= 3.11 (diffgap's requires-python; `docker run --rm IMAGE python3 -V` tells).
ARG TRITON_RELEASE=25.01
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3

WORKDIR /opt/diffgap
COPY pyproject.toml README.md ./
COPY diffgap ./diffgap
COPY runtime ./runtime
COPY triton_models ./triton_models
COPY export ./export
# `runtime` extra: onnxruntime for CPU (the python models' encoders run there); no torch.
RUN python3 -m pip install --no-cache-dir ".[runtime]"
