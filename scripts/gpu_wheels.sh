#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with the Python packages a GPU machine's image lacks, for
# scripts/gpu_check.sh to install offline (`pip install --no-index --find-links .gpu_wheels`).
#
# Run HERE, on a machine with the package registry, from the repo root: bash scripts/gpu_wheels.sh
# The GPU image (Python 3.12, torch 2.11 + CUDA, triton 3.6, transformers 5.x, tokenizers, safetensors,
# numpy, pytest, hypothesis, scipy, httpx, einops...) has no hydra-core, omegaconf, fastapi/uvicorn,
# pydivsufsort, openai or mamba-ssm. Binary wheels are fetched for CPython 3.12 on manylinux x86_64
# (--no-deps: every missing dependency is named below, one version each); mamba-ssm has no such wheel
# on PyPI, so it is built here as a pure-Python wheel without its CUDA extension
# (MAMBA_SKIP_CUDA_BUILD): its Triton kernels (mamba_chunk_scan_combined) need none.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PY=${PYTHON:-python3}
mkdir -p "$DEST"

# name==version, the versions this project's .venv runs (pip list there), plus their missing dependencies
PACKAGES=(
  hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 hydra-joblib-launcher==1.2.0
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0
  opentelemetry-api==1.45.2 typing-extensions==4.16.0
  pydivsufsort==0.0.20 openai==3.57.0 distro==1.9.0 jiter==0.19.0 sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2
  truststore==0.10.5
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_24_x86_64)
plat_args=()
for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
# antlr4-python3-runtime 4.9.3 is an sdist only: build its (pure) wheel here; the rest are binaries.
for pkg in "${PACKAGES[@]}"; do
  if [[ $pkg == antlr4-python3-runtime* ]]; then
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$pkg"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat_args[@]}" -d "$DEST" "$pkg"
  fi
done

# mamba-ssm: pure wheel (no CUDA extension; the GPU set-up puts a stub `selective_scan_cuda` on PYTHONPATH
# because `import mamba_ssm` imports it). Built without isolation against the local torch (setup.py imports it).
MAMBA=${MAMBA_SSM:-mamba-ssm==2.3.2.post1}
if ! ls "$DEST"/mamba_ssm-*.whl >/dev/null 2>&1; then
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$PY" -m pip wheel -q --no-deps --no-build-isolation \
    -w "$DEST" "$MAMBA"
fi
ls -la "$DEST"
du -sh "$DEST"
