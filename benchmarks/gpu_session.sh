#!/usr/bin/env bash
# Bounded GPU validation passes for a lent H100/H200 (torch + triton preinstalled, no network):
#   OUT=dir bash benchmarks/gpu_session.sh build tests digits ops     # first pass
#   OUT=dir bash benchmarks/gpu_session.sh build cifar suite          # second pass
# build:  the extension in place (CUDA ops for sm_90); skipped when coup_fast/_C*.so already loads with
#         its CUDA kernels (carry it from an earlier pass); a copy of the .so goes to $OUT for that.
# tests:  the GPU tests (extension ops, Triton kernels, CUDA-graph and compiled engines, exact gradient, purify,
#         the published attack on the graph engine against torchsde).
# digits: benchmarks/throughput.py on the shipped digits models (t* = 0.1, N = 100).
# ops:    benchmarks/bench_ops.py (GB/s of the fused elementwise ops).
# cifar:  throughput.py with NCSN++ deep / WRN-28-10-sized networks (random weights, N = 10 steps).
# attacks: benchmarks/bench_attacks.py workload (a) at CIFAR size (NCSN++ deep + WRN-28-10, random weights),
#         B = 64, N = 10: the exact gradient (graph engine, fp32 and TF32) against DiffPure's sdeint_adjoint.
# published: benchmarks/bench_published.py at CIFAR size (NCSN++ deep + WRN-28-10, random weights), B = 64,
#         N = 10: the published attack's gradient on the graph engine (TF32) against torchsde's sdeint_adjoint
#         (fp32, the same Brownian path, and the official BrownianInterval), the exact gradient beside them.
# peak:   throughput.py purification and exact gradient, CIFAR size, B = 64, graph engine, TF32: the
#         fraction of the TF32 dense peak (%peak column, ~495 TFLOP/s on an H200).
# suite:  the whole test suite in parallel, in whatever time is left of TOTAL_S.
# Issue 18's one-call session (15 device minutes in all, no build: the Triton ops serve CUDA):
#   OUT=$OUT bash benchmarks/gpu_session.sh attacks peak
# Issue 24's (the published attack on the graph engine): TESTS_S=240 OUT=$OUT bash benchmarks/gpu_session.sh tests published
# Each stage has its own time limit, so a slow one cannot take the later ones with it; logs go to
# $OUT/stages.log (one file: few files come back from the device), benchmark JSON beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log, never abort the script
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"/tmp/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0))s"; tail -n "${TAIL:-25}" "/tmp/$name.log"
  { echo "==== $name rc=$rc: $*"; cat "/tmp/$name.log"; } >>"$OUT/stages.log"
}
cuda_ext_loads() {
  $PY -c "import coup_fast, sys; i = coup_fast.backend_info(); print(i); sys.exit(not i['extension_cuda'])"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if [ -d .whl ]; then  # packages the image lacks (torchsde, trampoline), carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site" COUP_FAST_NO_JIT=1  # run from the source tree; never JIT inside a stage

for what in "$@"; do
  case $what in
    build)
      if ! cuda_ext_loads; then
        # An image's own toolchain (CC/CXX, e.g. /opt/gcc) may link libstdc++ statically into the .so;
        # C++ exceptions from the ops then crashed the process (seen on the lent H200).  Prefer the
        # system compiler, which links the libstdc++ torch itself uses.
        echo "CC=${CC:-} CXX=${CXX:-}"; ls /usr/bin/gcc /usr/bin/g++ 2>&1
        if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
        rm -f coup_fast/_C*.so; rm -rf build
        stage build "${BUILD_S:-150}" $PY setup.py build_ext --inplace
        if ! cuda_ext_loads; then
          unset CC CXX; rm -rf build
          stage build_default_cc 150 $PY setup.py build_ext --inplace
        fi
        readelf -d coup_fast/_C*.so | grep NEEDED
        cp coup_fast/_C*.so "$OUT/" 2>/dev/null
      fi ;;
    tests)
      # -n 4: a crash in one test takes down one worker, not the run
      stage tests "${TESTS_S:-120}" $PY -m pytest -q -n 4 --timeout=120 -p no:cacheprovider -rs \
        tests/test_ext_ops.py tests/test_kernels_em_step.py tests/test_kernels_confidence.py tests/test_graphs.py \
        tests/test_exact_gradient.py tests/test_purify.py tests/test_noise.py tests/test_compiled.py \
        tests/test_published.py ;;
    digits)
      TAIL=60 stage digits "${DIGITS_S:-100}" $PY benchmarks/throughput.py --batch 1,64,512 \
        --knobs fp32,bf16 --repeat 2 --budget 2 --out "$OUT/throughput_digits.json" ;;
    ops)
      TAIL=40 stage ops 90 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py --benchmark-max-time=0.3 \
        --benchmark-columns=median,ops --benchmark-group-by=group --benchmark-json="$OUT/bench_ops.json" ;;
    cifar)
      TAIL=60 stage cifar "${CIFAR_S:-150}" $PY benchmarks/throughput.py --arch cifar --batch 1,64 --dt 1e-2 \
        --knobs fp32,tf32,bf16 --repeat 1 --budget 3 --out "$OUT/throughput_cifar.json" ;;
    attacks)
      TAIL=40 stage attacks "${ATTACKS_S:-300}" $PY -m benchmarks.bench_attacks --arch cifar --device cuda --batch 64 \
        --dt 1e-2 --workloads a --methods diffpure,defaults,best --repeats 1 --out "$OUT/bench_attacks_cifar.json" ;;
    published)
      TAIL=20 stage published "${PUBLISHED_S:-300}" $PY -m benchmarks.bench_published --arch cifar --device cuda \
        --batch 64 --dt 1e-2 --knob tf32 --repeats 2 --out "$OUT/bench_published_cifar.json" ;;
    peak)
      TAIL=30 stage peak "${PEAK_S:-200}" $PY benchmarks/throughput.py --arch cifar --batch 64 --dt 1e-2 \
        --knobs tf32 --engines graph --repeat 2 --budget 3 --out "$OUT/throughput_cifar_tf32.json" ;;
    suite)
      left=$(( ${TOTAL_S:-570} - SECONDS ))
      if [ "$left" -gt 40 ]; then
        COUP_FAST_QUICK_TESTS=1 stage suite "$left" $PY -m pytest -q -n 8 -p no:cacheprovider -rs tests
      fi ;;
    *) echo "unknown stage $what" >&2 ;;
  esac
done
echo "== done in ${SECONDS}s"
