#!/usr/bin/env bash
# The GPU check of benchmarks/GPU.md, run from the repository root on a machine with a
# CUDA build of jax (the tests never need one): the test suite on the GPU, then the
# runtime benchmarks (compiled slices, gradients, loops) there.
#
#   bash benchmarks/gpu_check.sh            # logs in $OUT (default /tmp/gpu-check)
#
# Packages that machine lacks can wait as wheels in .whl/ (GPU.md says which); the test
# files that need a browser or a notebook kernel (nbclient) are left out. Each part stops at its
# time limit (TEST_S, BENCH_S seconds; 0 skips it) and still prints what it has.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c 'import jax, jaxlib; print("jax", jax.__version__, jaxlib.__version__, jax.devices())'
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true

# the suite on the GPU: full float32 matmuls (the references are compared at 1e-5), XLA's
# default flags (conftest's CPU flags are for the CPU), one process per core; the CPU
# listed too, for the tests' jax.debug.callback (JAX runs callbacks there)
[ "${TEST_S:-300}" != 0 ] && JAXSURGERY_TEST_PLATFORMS=cuda,cpu JAX_DEFAULT_MATMUL_PRECISION=highest XLA_FLAGS= \
  timeout -s INT -k 30 "${TEST_S:-300}" python3 -m pytest -q -n "${WORKERS:-12}" -rfE \
  --ignore=tests/test_browser.py --ignore=tests/test_browser_table.py \
  --ignore=tests/test_browser_view.py --ignore=tests/test_notebooks.py \
  --ignore=tests/test_views.py >"$OUT/tests.log" 2>&1
echo "tests: exit $?"
tail -n 40 "$OUT/tests.log"

# the runtime benchmarks on the GPU, with JAX's defaults
[ "${BENCH_S:-200}" = 0 ] && exit 0
(cd benchmarks && timeout -s INT -k 30 "${BENCH_S:-200}" python3 -c '
import bench_loops, bench_runtime, bench_grads
bench_runtime.run(); bench_grads.run(); bench_loops.run()
') >"$OUT/bench.log" 2>&1
echo "bench: exit $?"
cat "$OUT/bench.log"
