#!/usr/bin/env bash
# One command for a GPU machine without registry access: install, report, test, benchmark, resources.
#
#   bash bench/gpu_check.sh OUT_DIR [full|quick|dry-run]        (default full; or GPU_CHECK_MODE)
#
# Modes, sized for a 15-minute device budget:
#   full     every step below; budget 480 s (8 min), so one 10-minute device call holds it
#   quick    install without the CUDA extension, the native Triton tests of the default dtypes, the
#            attention benchmark at n=50 only, resources; budget 230 s (about 4 min)
#   dry-run  on a CPU machine: every step at a tiny size, the tests under the Triton interpreter (2
#            shards, so the sharding is exercised), the resources step on the stand-in driver; nothing is
#            installed. tests/test_bench_smoke.py runs it in CI so that the script cannot break the next
#            GPU call.
#
# Steps (each under `timeout`, each allowed to fail; the script records it and goes on):
#   install        pip install -e . --no-build-isolation --no-deps   (builds the CUDA extension)
#   info           python -m awr_fast.info
#   gpu_tests      tests/test_triton_dot.py, test_triton_w2.py, test_triton_w2_scores.py, test_w2_topk.py, test_triton_calibrated.py,
#                  test_triton_calibrated_backward.py, test_build.py, test_cuda_dot.py, test_cuda_w2.py, test_cuda_resources.py natively (conftest sets TRITON_INTERPRET only without CUDA), in GPU_TEST_SHARDS
#                  (default 12) parallel pytest processes
#   bench_attn     bench/attention.py: the issue's shapes (B=256, d=64, H 1 and 2, n 50 and 200, bf16), dot
#                  family, eager/compile/triton/cuda/SDPA, bounded by --time-budget; the W2 family (H 1, n 50
#                  and 200) with a third of the budget and the calibrated family (H 4, n 50 and 200; triton
#                  fwd+bwd against compile and SDPA) with a quarter of the rest (full mode); then Beauty's lengths
#   bench_w2       bench/w2_scoring.py: W2 item scoring (B=256, |V|=60k, d=64, bf16; every backend, fwd and
#                  fwd+bwd) and the fused top-k beside one (B x d)(d x |V|) matmul (full mode)
#   breakdown      bench/breakdown.py: host vs device time and the kernels of one step (simp, value; n=50, 200;
#                  the Triton path fused and tiled; Beauty lengths when .gpu_data/Beauty.txt is present)
#   resources      bench/kernel_resources.py --scan-cache: registers, spills and shared memory of every
#                  Triton kernel this run compiled (TRITON_CACHE_DIR is OUT_DIR/triton_cache, fresh)
#   sanitizer      compute-sanitizer memcheck (w2_scores and its top-k, dot_refined, w2_refined) and racecheck (the fused
#                  blocks' shared-memory phases) on small shapes of the CUDA extension's ops (when it was built)
#   bench_train    bench/train.py --quick
# Output: OUT_DIR/gpu_check.log (every step's output, in sections), OUT_DIR/summary.txt (the table printed
# last: steps, tests passed/failed, each Triton ratio against its target, kernels that spill),
# OUT_DIR/breakdown*.txt, OUT_DIR/results/{attention,train,kernel_resources}.{csv,jsonl} (copy them into
# bench/results/ to keep them).
# Exit status: 0 if every step passed or was skipped, 1 otherwise.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds for the whole script, default the mode's;
# each step's timeout is the smaller of its own and what is left),
# GPU_CHECK_STEPS (comma list of the steps to run, default all; e.g. install,info,bench_attn),
# RESULTS_DIR (default OUT_DIR/results), BENCH_ATTN_ARGS (replace the attention benchmark's arguments,
# default: the issue's shapes, --family dot --d 64 --heads 1,2 --n 50,200 --dtype bf16 --backends
# sdpa,eager,compile,triton,cuda, then Beauty's lengths at n=50 when .gpu_data/Beauty.txt was carried).
# .gpu_data/ is git-ignored: copy ../shared/data/Beauty.txt there and name it in the device call's carry.

set -u -o pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR [full|quick|dry-run]" >&2
    exit 2
fi
OUT_DIR=$1
MODE=${2:-${GPU_CHECK_MODE:-full}}
case $MODE in
    full) DEFAULT_BUDGET=480 ;;
    quick) DEFAULT_BUDGET=230 ;;
    dry-run) DEFAULT_BUDGET=420 ;;
    *)
        echo "gpu_check.sh: mode: expected full, quick or dry-run, got '$MODE'" >&2
        exit 2
        ;;
esac
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-$DEFAULT_BUDGET}
RESULTS_DIR=${RESULTS_DIR:-$OUT_DIR/results}
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/summary.txt
export PYTHONUNBUFFERED=1 PY RESULTS_DIR MODE
unset TRITON_INTERPRET  # the point is to run the kernels natively (dry-run: the tests' conftest sets it)
export TRITON_CACHE_DIR=$OUT_DIR/triton_cache  # fresh: the resources step reports what this run compiled
rm -rf "$TRITON_CACHE_DIR"
mkdir -p "$RESULTS_DIR" "$TRITON_CACHE_DIR"
: >"$LOG"

START=$(date +%s)
NAMES=()
STATUSES=()
SECONDS_TAKEN=()
FAILED=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_SECONDS COMMAND... : runs COMMAND under timeout (the smaller of MAX_SECONDS and what is
# left of the budget), appends its output to the log, records pass / FAIL (rc) / TIMEOUT / skipped.
step() {
    local name=$1 max=$2
    shift 2
    local left limit t0 rc status
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
        return 0  # not selected
    fi
    left=$(remaining)
    limit=$(( max < left - 5 ? max : left - 5 ))
    t0=$(date +%s)
    if [ "$limit" -lt 15 ]; then
        status="skipped (no time left)"
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$LOG"
    else
        echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
        # bash -c so that a step may be one of the exported shell functions below
        STEP_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        if [ "$rc" -eq 0 ]; then
            status="pass"
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            status="TIMEOUT"; FAILED=1
        elif [ "$rc" -eq 75 ]; then  # EX_TEMPFAIL: the step decided it had nothing to run
            status="skipped"
        else
            status="FAIL (rc $rc)"; FAILED=1
        fi
        echo "=== $name: $status after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
    fi
    NAMES+=("$name")
    STATUSES+=("$status")
    SECONDS_TAKEN+=("$(( $(date +%s) - t0 ))")
}

# ---------------------------------------------------------------------------------------------- steps

install() {
    case $MODE in
        full) "$PY" -m pip install -e . --no-build-isolation --no-deps ;;
        quick) AWR_FAST_SKIP_CUDA_BUILD=1 "$PY" -m pip install -e . --no-build-isolation --no-deps ;;
        dry-run)  # nothing is installed on a CPU machine: the checkout must already import
            "$PY" -c "import awr_fast, awr_fast.kernels.dot_refined; print('awr_fast', awr_fast.__version__, 'imports')" ;;
    esac
}
export -f install
step install 150 install
step info 20 "$PY" -m awr_fast.info

gpu_tests() {
    # The native Triton/CUDA tests are dominated by kernel compilation (about 10 s a test on one
    # core), so they run as GPU_TEST_SHARDS parallel pytest processes sharing Triton's disk cache.
    # Test ids go to pytest.main as a list, never through the shell (some ids contain spaces).
    local shards=${GPU_TEST_SHARDS:-12} dir files=(tests/test_triton_dot.py tests/test_triton_w2.py tests/test_triton_w2_scores.py tests/test_w2_topk.py tests/test_triton_calibrated.py tests/test_triton_calibrated_backward.py tests/test_build.py tests/test_cuda_dot.py tests/test_cuda_w2.py tests/test_cuda_resources.py) select=()
    case $MODE in
        quick) files=(tests/test_triton_dot.py tests/test_triton_w2.py); select=(-k "grid_gpu_dtypes and not dtype1 or causality or window") ;;
        dry-run) shards=${GPU_TEST_SHARDS:-2}; files=(tests/test_triton_dot.py); select=(-k "causality or fully_padded") ;;
    esac
    dir=$(mktemp -d)
    "$PY" -m pytest "${files[@]}" "${select[@]}" --collect-only -q -p no:cacheprovider \
        | grep '::' >"$dir/ids" || { echo "collection failed"; return 1; }
    echo "$(wc -l <"$dir/ids") tests in $shards shards"
    split -n "r/$shards" "$dir/ids" "$dir/shard_"
    local pids=() f
    for f in "$dir"/shard_*; do
        "$PY" -c 'import sys, pytest; ids = open(sys.argv[1]).read().splitlines()
sys.exit(pytest.main(ids + ["-q", "-rfE", "-p", "no:cacheprovider"]))' "$f" >"$f.log" 2>&1 &
        pids+=($!)
    done
    local rc=0 i=0
    for f in "$dir"/shard_*[!g]; do
        wait "${pids[$i]}" || rc=1
        echo "--- $(basename "$f"): $(tail -1 "$f.log")"
        grep -E "^(FAILED|ERROR)" "$f.log" || true
        i=$((i + 1))
    done
    cat "$dir"/shard_*.log >"$OUT_DIR/gpu_tests_shards.log"
    return $rc
}
export -f gpu_tests
export OUT_DIR
step gpu_tests "$( [ "$MODE" = quick ] && echo 80 || echo 180 )" gpu_tests


bench_attention() {
    # leave time to print the table and write the results
    local budget=$(( STEP_LIMIT > 80 ? STEP_LIMIT - 40 : STEP_LIMIT / 2 ))
    local real_budget=0
    if [ -f .gpu_data/Beauty.txt ] && [ -z "${BENCH_ATTN_ARGS:-}" ] && [ "$MODE" = full ]; then
        real_budget=$(( budget / 4 ))
        budget=$(( budget - real_budget ))
    fi
    # the issue's shapes first (B=256, d=64, H=1 then 2, n=50 then 200, bf16), every dot mechanism;
    # cases left when the budget runs out are recorded as skipped
    local default_args="--family dot --d 64 --heads 1,2 --n 50,200 --dtype bf16 --backends sdpa,eager,compile,triton,cuda --min-time 0.05"
    case $MODE in
        quick) default_args="--family dot --d 64 --heads 1 --n 50 --dtype bf16 --backends sdpa,eager,compile,triton --min-time 0.05" ;;
        dry-run) default_args="--quick --family dot --batch 2 --n 20 --d 32 --heads 1 --mechanisms none,simp --backends sdpa,eager,triton --min-time 0.01" ;;
    esac
    # then STOSA's W2 family at the same shapes (issue 10's targets), a third of what is left, and AC-TSR's
    # calibrated attention at the released shape (H 4, n 50; and 200), forward and backward, a quarter of the rest
    local w2_args="" w2_budget=0 cal_args="" cal_budget=0
    if [ -z "${BENCH_ATTN_ARGS:-}" ]; then
        case $MODE in
            full) w2_args="--family w2 --d 64 --heads 1 --n 50,200 --dtype bf16 --backends sdpa,eager,compile,triton,cuda --min-time 0.05"
                  cal_args="--family calibrated --d 64 --heads 4 --n 50,200 --dtype bf16 --backends sdpa,compile,triton --min-time 0.05" ;;
            dry-run) w2_args="--quick --family w2 --batch 2 --n 20 --d 32 --heads 1 --mechanisms none,simp,stoc --backends eager,triton --min-time 0.01" ;;
        esac
        if [ -n "$w2_args" ]; then
            w2_budget=$(( budget / 3 ))
            budget=$(( budget - w2_budget ))
        fi
        if [ -n "$cal_args" ]; then
            cal_budget=$(( budget / 4 ))
            budget=$(( budget - cal_budget ))
        fi
    fi
    # shellcheck disable=SC2086
    "$PY" bench/attention.py ${BENCH_ATTN_ARGS:-$default_args} \
        --time-budget "$budget" --results-dir "$RESULTS_DIR" || return $?
    if [ "$w2_budget" -gt 0 ]; then
        # shellcheck disable=SC2086
        "$PY" bench/attention.py $w2_args --time-budget "$w2_budget" --results-dir "$RESULTS_DIR" || return $?
    fi
    if [ "$cal_budget" -gt 0 ]; then
        # shellcheck disable=SC2086
        "$PY" bench/attention.py $cal_args --time-budget "$cal_budget" --results-dir "$RESULTS_DIR" || return $?
    fi
    if [ "$real_budget" -gt 0 ]; then  # padded vs length-aware with Beauty's lengths (issue: length-aware)
        "$PY" bench/attention.py --family dot --d 64 --heads 1 --n 50 --dtype bf16 --backends eager,triton \
            --lengths-from .gpu_data/Beauty.txt --min-time 0.05 --time-budget "$real_budget" --results-dir "$RESULTS_DIR"
    fi
}
export -f bench_attention
step bench_attn 200 bench_attention

bench_w2_scoring() {  # STOSA's full-ranking scoring against one matmul (issue shape B=256, |V|=60k, d=64, bf16)
    case $MODE in
        quick) echo "quick mode: no W2 scoring benchmark"; return 75 ;;
        dry-run) "$PY" bench/w2_scoring.py --quick --batch 8 --items 500 --backends reference --min-time 0.02 \
            --results-dir "$RESULTS_DIR" ;;
        *) "$PY" bench/w2_scoring.py --min-time 0.2 --results-dir "$RESULTS_DIR" ;;
    esac
}
export -f bench_w2_scoring
step bench_w2 45 bench_w2_scoring

bench_train() {
    if [ "$MODE" != full ]; then
        echo "$MODE mode: no trainer benchmark"
        return 75
    fi
    if ! "$PY" -c "import awr_fast.train" 2>/dev/null; then
        echo "awr_fast.train is not importable; nothing to benchmark"
        return 75
    fi
    "$PY" bench/train.py --quick --results-dir "$RESULTS_DIR"
}
export -f bench_train
breakdown() {
    if [ "$MODE" = quick ]; then
        echo "quick mode: no breakdown"
        return 75
    fi
    if [ "$MODE" = dry-run ]; then
        "$PY" bench/breakdown.py --quick --mechanisms simp --backends eager,sdpa --out "$OUT_DIR/breakdown.txt"
        return $?
    fi
    local lengths=()
    [ -f .gpu_data/Beauty.txt ] && lengths=(--lengths-from .gpu_data/Beauty.txt)
    "$PY" bench/breakdown.py --mechanisms simp,value --n 50,200 --backends triton,eager,sdpa \
        "${lengths[@]}" --out "$OUT_DIR/breakdown.txt" || return $?
    # the same Triton cases on the tiled kernels only, to see what the fused path buys at n=50
    AWR_FAST_TRITON_FUSED_MAX_N=0 "$PY" bench/breakdown.py --mechanisms simp,value --n 50 --backends triton \
        "${lengths[@]}" --out "$OUT_DIR/breakdown_tiled.txt"
}
export -f breakdown
step breakdown 120 breakdown

resources() {
    if [ "$MODE" = dry-run ]; then  # compile one configuration for sm_90 on the stand-in driver first
        "$PY" bench/kernel_resources.py --arch 90 --n 50 --dtypes bf16 --mechanisms none --no-save || return $?
    fi
    "$PY" bench/kernel_resources.py --scan-cache "$TRITON_CACHE_DIR" --results-dir "$RESULTS_DIR"
}
export -f resources
step resources 90 resources

sanitizer() {
    if [ "$MODE" != full ]; then
        echo "$MODE mode: no sanitizer run"
        return 75
    fi
    local cs
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
    if [ -z "$cs" ]; then
        echo "compute-sanitizer not found"
        return 75
    fi
    if ! "$PY" -c "import sys; from awr_fast._ext import cuda_status; ok, why = cuda_status(); print(why); sys.exit(0 if ok else 3)"; then
        echo "the CUDA extension is not usable here; nothing to sanitize"
        return 75
    fi
    local driver=/tmp/awr_fast_sanitize_driver.py
    cat >"$driver" <<'EOF'
# Tiny driver for compute-sanitizer: the CUDA extension's op at odd sizes, every dtype, checked against
# the float64 reference. The caching allocator is off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that memcheck
# sees each tensor's real bounds.
import torch
from awr_fast._ext import w2_scores_cuda
from awr_fast.cuda.w2_scores import w2_topk
from awr_fast.reference.w2_scores import w2_scores as reference

g = torch.Generator().manual_seed(0)
for batch, items, d in ((1, 1, 1), (3, 37, 5), (17, 1000, 64), (5, 129, 50), (2, 33, 128)):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mu, item_mu = torch.randn(batch, d, generator=g), torch.randn(items, d, generator=g)
        sig = torch.nn.functional.elu(torch.randn(batch, d, generator=g)) + 1
        item_sig = torch.nn.functional.elu(torch.randn(items, d, generator=g)) + 1
        args = [t.to(dtype) for t in (mu, sig, item_mu, item_sig)]
        out = w2_scores_cuda(*(t.cuda() for t in args))
        torch.cuda.synchronize()
        ref = reference(*(t.double() for t in args))
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert err < tol, (batch, items, d, dtype, err)
        print(f"w2_scores_cuda B={batch} V={items} d={d} {dtype}: rel err {err:.2e}")
        # the fused top-k, with a history by ids (bits) and the padding item excluded
        k = min(items, 33 if items > 40 else items)
        ids = torch.randint(-1, items, (batch, 5), generator=g)
        values, indices = w2_topk(*(t.cuda() for t in args), k, ids.cuda(), exclude_padding=items > 1)
        torch.cuda.synchronize()
        skipped = torch.zeros(batch, items, dtype=torch.bool)
        rows, cols = (ids >= 0).nonzero(as_tuple=True)
        skipped[rows, ids[rows, cols]] = True
        skipped[:, 0] |= items > 1
        truth = ref.masked_fill(skipped, float("inf")).topk(k, dim=1, largest=False).values
        gap = (values.double().cpu() - truth).nan_to_num(posinf=0.0).abs().max().item()
        assert gap < 0.05 * (1 + truth.nan_to_num(posinf=0.0).abs().max().item()), (batch, items, d, dtype, gap)
        print(f"w2_topk_cuda B={batch} V={items} d={d} k={k} {dtype}: max value gap {gap:.2e}")

# dot_refined: every mechanism, forward and backward against the oracle, then with dropout
import awr_fast  # noqa: E402
from awr_fast.testing import make_case, oracle_errors  # noqa: E402

for mechanism in ("none", "simp", "add", "value"):
    for n in (7, 50):
        case = make_case("dot_refined", mechanism, n=n, d_h=16, batch=3, padding="left", dtype=torch.float32)
        case = case.to(device="cuda")
        failures = oracle_errors(case, "cuda")
        assert not failures, (mechanism, n, failures)
        q, k, v = (t.detach().clone().requires_grad_(True) for t in case.tensors.values())
        out = awr_fast.refined_attention(
            q, k, v, mechanism=mechanism, **case.weights, **case.options, dropout_p=0.3, backend="cuda"
        )
        out.sum().backward()
        torch.cuda.synchronize()
        print(f"dot_refined_cuda {mechanism} n={n}: matches the oracle; dropout fwd+bwd ran")
for mechanism in ("none", "simp", "value", "stoc"):
    case = make_case("w2_refined", mechanism, n=37, d_h=16, batch=3, padding="arbitrary", dtype=torch.float32)
    failures = oracle_errors(case.to(device="cuda"), "cuda")
    assert not failures, (mechanism, failures)
    print(f"w2_refined_cuda {mechanism} n=37: matches the oracle")
print("driver done")
EOF
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 1 --leak-check no "$PY" "$driver" || return 1
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool racecheck --error-exitcode 1 "$PY" "$driver"
}
export -f sanitizer
step sanitizer 120 sanitizer

step bench_train 60 bench_train

# -------------------------------------------------------------------------------------------- summary

{
    echo
    echo "gpu_check summary, $MODE mode ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s of ${BUDGET}s, repo $REPO)"
    "$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device', '| torch', torch.__version__)" 2>/dev/null
    printf '%-14s %-24s %8s\n' step status seconds
    printf '%-14s %-24s %8s\n' -------------- ------------------------ --------
    for i in "${!NAMES[@]}"; do
        printf '%-14s %-24s %8s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}"
    done
    echo
    "$PY" bench/gpu_summary.py --results-dir "$RESULTS_DIR" --tests-log "$OUT_DIR/gpu_tests_shards.log" 2>&1
    echo "log: $LOG; results: $RESULTS_DIR"
} | tee "$SUMMARY" | tee -a "$LOG"
exit $FAILED
