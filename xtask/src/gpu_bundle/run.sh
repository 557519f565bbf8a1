#!/usr/bin/env bash
# The GPU bundle's entry point, for a machine with an NVIDIA driver, the CUDA tools
# (compute-sanitizer) and Python with torch and pytest, but no Rust toolchain and no network.
# Written by `cargo xtask gpu-bundle`. Results go to $OUT (default: ./out beside this script).
#
#   run.sh [tests] [python] [sanitizer] [cli] [bench] [anchor] [dispatch] [profile] [devices]
#   (default: the first seven, in this order; profile runs Nsight Compute on the bench's kernels)
#
# The tests of device ordinal 1 (the Rust binary `second_device`, the Python module's
# `test_second_device.py`) run in `tests` and `python` too, where they skip on a machine with one
# GPU. `devices`, for a machine with two or more, runs only them with SLUICE_REQUIRE_GPUS=2, which
# makes a missing second device fail them instead.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests python sanitizer cli bench anchor dispatch)
export SLUICE_REQUIRE_GPU=1 SLUICE_TESTDATA="$here/models/testdata"
tokens="${SLUICE_BENCH_TOKENS:-1,64,1024,16384}"
failed=0
summary=()

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    | tee "$out/device.txt"
gpus="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU')"

# Installs the wheel without network into a new folder and prints the folder; pip's log goes to
# $1. The caller removes the folder.
install_wheel() {
    local site
    site="$(mktemp -d)"
    if python3 -m pip install -q --no-deps --no-index --target "$site" \
        "$here"/python/sluice-*.whl >"$1" 2>&1; then
        echo "$site"
    else
        rm -rf "$site"
        return 1
    fi
}

for step in "${steps[@]}"; do
    case "$step" in
    tests)
        for test in "$here"/tests/*; do
            name="$(basename "$test")"
            if "$test" --test-threads=1 >"$out/test-$name.log" 2>&1; then
                summary+=("tests $name: ok ($(grep -h '^test result' "$out/test-$name.log" | tail -1))")
            else
                failed=1
                summary+=("tests $name: FAILED (see test-$name.log)")
                tail -30 "$out/test-$name.log"
            fi
        done
        ;;
    python)
        # The wheel, installed without network into a folder of its own, and the Python module's
        # CUDA tests with torch as the client (SLUICE_REQUIRE_GPU: a missing GPU fails them),
        # the dispatch layout's and the README's examples among them.
        log="$out/python.log"
        site=""
        if site="$(install_wheel "$log")" &&
            PYTHONPATH="$site" PYTHONDONTWRITEBYTECODE=1 python3 -m pytest -q -rs \
                -p no:cacheprovider "$here/python/tests/test_cuda.py" \
                "$here/python/tests/test_dispatch_layout.py" \
                "$here/python/tests/test_second_device.py" \
                "$here/python/tests/test_readme.py" >>"$log" 2>&1; then
            summary+=("python: ok ($(tail -1 "$log"))")
        else
            failed=1
            summary+=("python: FAILED (see python.log)")
            tail -40 "$log"
        fi
        [ -n "$site" ] && rm -rf "$site"
        ;;
    sanitizer)
        for tool in memcheck racecheck initcheck; do
            for test in "$here"/tests/*; do
                name="$(basename "$test")"
                # A binary without tests makes no CUDA call, which the sanitizer reports as an error;
                # so does `second_device` on a machine with one GPU, where it skips.
                "$test" --list 2>/dev/null | grep -q ': test$' || continue
                [ "$name" = second_device ] && [ "$gpus" -lt 2 ] && continue
                # The golden sweep routes every fixture family through kernels the random configs
                # already run (compiled for other configs): memcheck takes the random configs,
                # every GEMM path and routing decision among them; the slower tools the rest.
                skip=(--skip golden_fixtures)
                [ "$tool" != memcheck ] && skip+=(--skip random_configs)
                log="$out/sanitizer-$tool.log"
                echo "== $tool $name" >>"$log"
                if compute-sanitizer --tool "$tool" --error-exitcode 9 \
                    "$test" --test-threads=1 "${skip[@]}" >>"$log" 2>&1; then
                    summary+=("$tool $name: $(grep -h 'SUMMARY' "$log" | tail -1)")
                else
                    failed=1
                    summary+=("$tool $name: FAILED (see sanitizer-$tool.log)")
                fi
            done
        done
        ;;
    cli)
        # The demo routes a V3-shaped gate and checks it against the scalar reference.
        for t in 1 64 1000; do
            if "$here/bin/sluice" demo --backend cuda --tokens "$t" >"$out/demo-$t.log" 2>&1; then
                summary+=("demo --backend cuda --tokens $t: ok")
            else
                failed=1
                summary+=("demo --backend cuda --tokens $t: FAILED (see demo-$t.log)")
                tail -20 "$out/demo-$t.log"
            fi
        done
        ;;
    bench)
        for model in v3 kimi-k2; do
            if ! "$here/bin/sluice" bench --backend cuda --model "$model" --tokens "$tokens" \
                --min-seconds 0.05 --json "$out/sluice-$model.json"; then
                failed=1
                summary+=("bench $model: FAILED")
            fi
        done
        ;;
    anchor)
        if python3 "$here/anchors/torch_gate_gpu.py" --shapes v3,k2 --tokens "$tokens" \
            --deadline1 150 --deadline2 230 --json "$out/torch.json" >"$out/torch.log" 2>&1; then
            tail -20 "$out/torch.log"
        else
            failed=1
            summary+=("anchor: FAILED (see torch.log)")
            tail -30 "$out/torch.log"
        fi
        ;;
    dispatch)
        # The layout after the graph-replayed gate at every T, and against the sort-based PyTorch
        # version at T = 16384 (V3: K = 8, E = 256), in one run; dispatch.md is the side by side.
        if "$here/bin/sluice" bench --backend cuda --model v3 --dispatch --tokens "$tokens" \
            --min-seconds 0.05 --json "$out/sluice-dispatch.json" >"$out/sluice-dispatch.log" 2>&1 \
            && python3 "$here/anchors/torch_dispatch_gpu.py" --tokens 16384 --experts 256 \
                --top-k 8 --json "$out/torch-dispatch.json" \
                --sluice-json "$out/sluice-dispatch.json" --markdown "$out/dispatch.md" \
                >"$out/torch-dispatch.log" 2>&1; then
            cat "$out/sluice-dispatch.log" "$out/dispatch.md"
            summary+=("dispatch: ok (see dispatch.md)")
        else
            failed=1
            summary+=("dispatch: FAILED (see sluice-dispatch.log, torch-dispatch.log)")
            tail -30 "$out/sluice-dispatch.log" "$out/torch-dispatch.log" 2>/dev/null
        fi
        ;;
    profile)
        for t in ${tokens//,/ }; do
            ncu --clock-control none -k regex:sluice_ -c 20 --print-summary per-kernel \
                "$here/bin/sluice" bench --backend cuda --model v3 --tokens "$t" --min-seconds 0.001 \
                >"$out/ncu-v3-$t.log" 2>&1 || summary+=("profile T=$t: ncu FAILED")
            grep -E "sluice_|Duration|Memory Throughput|DRAM Throughput" "$out/ncu-v3-$t.log" | head -24
        done
        ;;
    devices)
        # Device ordinal 1: the Rust tests and the Python ones, failing rather than skipping
        # where this machine has fewer than two GPUs.
        log="$out/devices.log"
        site=""
        if SLUICE_REQUIRE_GPUS=2 "$here/tests/second_device" --test-threads=1 >"$log" 2>&1 &&
            site="$(install_wheel "$out/devices-wheel.log")" &&
            SLUICE_REQUIRE_GPUS=2 PYTHONPATH="$site" PYTHONDONTWRITEBYTECODE=1 \
                python3 -m pytest -q -rs -p no:cacheprovider \
                "$here/python/tests/test_second_device.py" >>"$log" 2>&1; then
            summary+=("devices ($gpus GPUs): ok ($(grep -h '^test result' "$log" | tail -1); $(tail -1 "$log"))")
        else
            failed=1
            summary+=("devices ($gpus GPUs): FAILED (see devices.log)")
            tail -40 "$log"
        fi
        [ -n "$site" ] && rm -rf "$site"
        ;;
    *)
        echo "unknown step $step (tests, python, sanitizer, cli, bench, anchor, dispatch, profile, devices)" >&2
        exit 2
        ;;
    esac
done

if [ -f "$out/torch.json" ] && ls "$out"/sluice-*.json >/dev/null 2>&1; then
    python3 "$here/side_by_side.py" "$out" | tee "$out/side_by_side.md"
fi
printf '%s\n' "${summary[@]}"
exit $failed
