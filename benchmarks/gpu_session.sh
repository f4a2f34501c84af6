#!/usr/bin/env bash
# The GPU work of one session, in parts that each fit the lent machine's 10-minute limit per
# command. Run on the GPU machine, from the repository root, with .whl/ (benchmarks/fetch_gpu_wheels.sh)
# carried along:
#
#   bash benchmarks/gpu_session.sh tests      # tests/test_cuda.py: graphed decoding, the trainer on CUDA (~3 min)
#   bash benchmarks/gpu_session.sh sampling   # bench_generate.py (~4 min)
#   bash benchmarks/gpu_session.sh tuned      # batch 1: compiled decoding with and without coordinate-descent tuning
#   bash benchmarks/gpu_session.sh training   # bench_train.py, the compiled variants that matter (~8 min)
#   bash benchmarks/gpu_session.sh profile    # profile_decode.py: kernels and device time per decoding step (~2 min)
#   bash benchmarks/gpu_session.sh train-profile  # profile_train.py: ours, nanogpt, hf compiled, time by kind of kernel (~3 min)
#   bash benchmarks/gpu_session.sh attention  # bench_train.py with SDPA pinned to FlashAttention, then to cuDNN (~5 min)
#   bash benchmarks/gpu_session.sh stepgraph  # bench_train.py, the whole step (AdamW too) as one CUDA graph (~4 min)
#   bash benchmarks/gpu_session.sh tied       # bench_train.py, W_U tied to W_E as nanoGPT trains (~4 min)
#
# Each appends its tables to benchmarks/RESULTS.md and, where $OUT is set, copies that file there,
# also when a step fails, so that whatever was measured comes back.
set -uo pipefail
cd "$(dirname "$0")/.."

part="${1:-}"
case "$part" in
    tests | sampling | tuned | training | profile | train-profile | attention | stepgraph | tied) ;;
    *)
        echo "usage: bash benchmarks/gpu_session.sh tests|sampling|tuned|training|profile|train-profile|attention|stepgraph|tied (got '${part}')" >&2
        exit 2
        ;;
esac
if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "no wheels in .whl/: run 'bash benchmarks/fetch_gpu_wheels.sh' online and carry .whl" >&2
    exit 2
fi
copy_results() { [ -n "${OUT:-}" ] && cp benchmarks/RESULTS.md "$OUT/"; }
trap copy_results EXIT

# the image's site-packages may not be writable: install beside it, as the device README advises
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$part" = tests ]; then
    # addopts off: shapes are the CPU suite's to check; these tests check CUDA behaviour only
    python3 -m pytest -q -o addopts="" tests/test_cuda.py
    exit $?
fi
if [ "$part" = sampling ]; then
    python3 benchmarks/bench_generate.py
    exit $?
fi
if [ "$part" = tuned ]; then
    python3 benchmarks/bench_generate.py --batch-sizes 1 --variants ours-bf16-compiled,ours-bf16-cdtuned-compiled,hf-static-bf16
    exit $?
fi
if [ "$part" = train-profile ]; then
    python3 benchmarks/profile_train.py
    exit $?
fi
if [ "$part" = attention ]; then
    python3 benchmarks/bench_train.py --variants \
        ours-padded-flash-compiled,ours-padded-cudnn-compiled,nanogpt-padded-flash-compiled,nanogpt-padded-cudnn-compiled
    exit $?
fi
if [ "$part" = stepgraph ]; then
    python3 benchmarks/bench_train.py --variants \
        ours-padded-stepgraph-compiled,ours-padded-cudnn-stepgraph-compiled,nanogpt-padded-stepgraph-compiled
    exit $?
fi
if [ "$part" = tied ]; then
    python3 benchmarks/bench_train.py --variants \
        ours-padded-tied-compiled,nanogpt-padded-compiled,ours-padded-tied-cudnn-compiled,ours-padded-tied-stepgraph-compiled
    exit $?
fi
if [ "$part" = profile ]; then
    python3 benchmarks/profile_decode.py --batch 1 && python3 benchmarks/profile_decode.py --batch 64 --top 6
    exit $?
fi
python3 benchmarks/bench_train.py --variants \
    ours-padded-compiled,hf-padded-compiled,nanogpt-padded-compiled,ours-padded-compiled-graphs,ours-padded-fusedloss-compiled,ours-compiled,hf-compiled
