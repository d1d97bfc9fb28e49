#!/usr/bin/env bash
# The GPU check of issue #11: ONE prepared command for a lent GPU machine, run from the repo root.
#
#   bash scripts/gpu_wheels.sh      # here, where the registry is: fills the ignored .gpu_wheels/
#   bash scripts/gpu_check.sh       # there (carry .gpu_wheels): results under $OUT, else benchmarks/gpu/
#
# 1. installs the carried wheels the image lacks (or has older) into a temporary site on PYTHONPATH, with
#    a stub `selective_scan_cuda` module (mamba-ssm is built without its CUDA extension; `import mamba_ssm`
#    imports it, its Triton kernels do not need it);
# 2. runs every `-m gpu` test (python3 -m pytest tests -m gpu: tests/gpu first, the compiled-artifact CUDA-graph
#    test in its own part, then the rest);
# 3. runs benchmarks/gpu_bench.py part by part (1.1 B Llama AR step vs floor and verify latency per tree,
#    the default pair's speculative vs own AR, transformers generate / assisted generation), each part in its
#    own process under its own timeout, each writing its JSON as soon as it is done; then the report
#    (gpu_bench.json, gpu_bench.md) from whatever parts finished.
# Every part has a time limit and the whole stays under 8 minutes; a failing or timed-out part does not
# stop the others. Output: gpu_check.log (everything printed), gpu_bench_*.json, gpu_bench.json, gpu_bench.md.
# Exit status: 0 when every part passed, else 1 (the results are written either way).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-benchmarks/gpu}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
unset TRITON_INTERPRET  # compiled Triton kernels on the GPU (tests/conftest.py sets it only without CUDA)
PY=${PYTHON:-python3}
START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-470}  # the whole run, leaving margin under 8 minutes
FAILED=()

budget() {  # budget NAME SECONDS: the part's own limit, cut to what is left of TOTAL
  local left=$((START + TOTAL - $(date +%s)))
  local t=$2
  ((left < t)) && t=$left
  ((t < 5)) && t=5
  echo "$t"
}

part() {  # part NAME SECONDS CMD...: run under a timeout, log its time and status
  local name=$1 limit
  limit=$(budget "$name" "$2")
  shift 2
  echo "=== $name (limit ${limit}s) at +$(( $(date +%s) - START ))s: $*"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after +$(( $(date +%s) - START ))s"
  ((rc == 0)) || FAILED+=("$name:$rc")
}

# ---- 1. carried wheels ---------------------------------------------------------------------------------
SITE=$(mktemp -d /tmp/gpu_site.XXXXXX)
STUB=$(mktemp -d /tmp/gpu_stub.XXXXXX)
printf '"""Stub: mamba-ssm built with MAMBA_SKIP_CUDA_BUILD has no CUDA extension; only its Triton kernels are used."""\n' \
  > "$STUB/selective_scan_cuda.py"
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  mapfile -t WANT < <("$PY" - <<'EOF'
# wheels whose distribution is absent here, or installed in an older version
import glob, importlib.metadata as md, re
from packaging.version import Version
for whl in sorted(glob.glob(".gpu_wheels/*.whl")):
    name, version = re.match(r"([^-]+)-([^-]+)-", whl.split("/")[-1]).groups()
    try:
        have = md.version(name.replace("_", "-"))
    except md.PackageNotFoundError:
        print(whl)
        continue
    if Version(have) < Version(version):
        print(whl)
EOF
  )
  echo "=== wheels: installing ${#WANT[@]} of $(ls .gpu_wheels/*.whl | wc -l) carried: ${WANT[*]##*/}"
  if ((${#WANT[@]})); then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      --find-links .gpu_wheels "${WANT[@]}" || FAILED+=("wheels")
  fi
else
  echo "=== wheels: no .gpu_wheels/ (run scripts/gpu_wheels.sh where the registry is and carry the folder)"
fi
export PYTHONPATH="$SITE:$STUB${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
"$PY" -c "import hydra, omegaconf; print('hydra', hydra.__version__, 'omegaconf', omegaconf.__version__)" \
  || FAILED+=("imports")

# ---- 2. the -m gpu tests -------------------------------------------------------------------------------
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 90)  # one stuck test must not eat the run
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 4)  # Triton compiles on the CPU cores in parallel
# tests/gpu first (the CUDA-graph and replay checks of this issue), then every other -m gpu test
part tests_gpu 90 "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider -rfEs "${PER_TEST[@]}" \
  --deselect tests/gpu/test_compiled_graphs_cuda.py
# AOTInductor compiles on the GPU machine's cores: its own part and limit
part tests_compiled_graphs 90 "$PY" -m pytest tests/gpu/test_compiled_graphs_cuda.py -m gpu -q -p no:cacheprovider -rfEs
part tests_rest 90 "$PY" -m pytest tests -m gpu --ignore=tests/gpu -q -p no:cacheprovider -rfEs \
  "${PARALLEL[@]}" "${PER_TEST[@]}" --continue-on-collection-errors

# ---- 3. the benchmark, one part per process --------------------------------------------------------------
# GPU_CHECK_BENCH_ARGS: extra arguments, e.g. --tiny for a dry run of this script on a CPU
read -ra BENCH <<<"${GPU_CHECK_BENCH_ARGS:-}"
part bench_llama 90 "$PY" benchmarks/gpu_bench.py --out "$OUTDIR" --part llama "${BENCH[@]}"
part bench_pair 70 "$PY" benchmarks/gpu_bench.py --out "$OUTDIR" --part pair "${BENCH[@]}"
part bench_hf 60 "$PY" benchmarks/gpu_bench.py --out "$OUTDIR" --part hf "${BENCH[@]}"
TOTAL=$((TOTAL + 20)) part report 20 "$PY" benchmarks/gpu_bench.py --out "$OUTDIR" --part report "${BENCH[@]}"

echo "=== done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}"
((${#FAILED[@]} == 0))
