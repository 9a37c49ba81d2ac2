#!/bin/bash
# Several GPU checks and benchmarks in one go, each under its own time limit, rows and logs under $OUT.
#
#   OUT=/tmp/out PYTHONPATH=. bash benchmarks/suite.sh tests step step1024 server server-profile engine trainer-wide
#
# Parts (run in the order given):
#   tests           pytest -m gpu (kernels, engine, deterministic mode, trainer, critic and distillation)
#   tests-engine    pytest -m gpu on the kernels, the engine and deterministic mode alone
#   step            the colocated GRPO step, TRL's GRPOTrainer first then leagues, 128 tokens (benchmarks/step.py)
#   step1024        leagues alone at 1,024 tokens with partial rollout and over-sampling
#   engine1024      the engine's batch-64 rate at 1,024 new tokens (the 1,024-token step's bound)
#   server          the HTTP front against in-process, 8 and 64 clients, streamed and not (benchmarks/server.py)
#   server-thread   the same with the server's engine on a thread of its process (`--engine_process false`)
#   server-mixed    the same with the engine's mixed steps (`--engine.mixed_steps true`, both sides)
#   server-interval the same with `--stream_interval 4` (an output's tokens sent 4 at a time)
#   server-fronts   the same with `--fronts 4` (four HTTP front processes over the one engine process)
#   server-admit    the same with arrivals deferred for 4 decode steps (`--engine.admit_after_decode_steps 4`, both sides)
#   server-profile  64 streaming clients with the server under py-spy (needs py-spy on PATH)
#   server-front    the HTTP front alone before a stand-in engine that costs nothing (benchmarks/server_front.py)
#   prefill         prefill latency at batches 1, 8, 64 and its profile, syncs and Python profile (benchmarks/prefill.py)
#   det             default and deterministic decode steps at batches 1, 8, 64, 256 in one process, and HF at 64
#   engine          decode steps at batches 1, 8, 64, 256 and the HF comparison (benchmarks/engine.py)
#   engine-blocks16 decode steps at 64 and 256 rows with the tiled MoE's 16-row expert blocks throughout (an A/B of
#                   `fused_moe.WIDE_BLOCKS` beside `det` or `engine`)
#   engine-wide     `engine` on the wide shape (Qwen3-30B-A3B layers), 128 and 1,024 new tokens, deterministic
#                   mode at 1, 64 and 256, HF at 64
#   trainer-wide    the trainer on the wide shape, 8 x 1,024 tokens (benchmarks/trainer.py)
#   sync            colocated weight sync on one rank against a device copy, anchor and wide (benchmarks/sync.py)
#   moe-tune        the tiled fused MoE launches' tiles at 64 and 256 tokens, both shapes (benchmarks/moe_small_tune.py)
#   profile-engine  the decode step's kernels by GPU time at batches 1 and 64, compiled, without graphs
#   profile-host    the step's phases, a cProfile of the host's unsynced steps and the kernels, graphs on, 64 and 256
#   decode-tune     the paged decode kernel's warps, stages and key tile at batches 1-256 (benchmarks/decode_tune.py)
#   matmul-tiles    deterministic mode's dense product under other tile shapes: bits kept? cost (benchmarks/matmul_tiles.py),
#                   the anchor's q/k/v, output and LM-head shapes
#   profile-det     the deterministic decode step's phases and kernels, graphs on, batches 1 and 256
#   moe-tune-few    the tiled fused MoE launches' tiles at 1 and 8 tokens, anchor (deterministic mode's decode sizes)
#   moe-tune-blocks the tiled launches with blocks of 16 and 64 rows an expert at 128 and 256 tokens, anchor
#   route-tune      the route launch's D tile and warps at 1, 8, 64 and 256 tokens, anchor
#   engine-base     benchmarks/engine.py from the tree at $BASE_TREE (a copy of an older commit carried beside the
#                   checkout), for an A/B in one call: run `engine` after it
# The ANCHORS.md checkpoint is made once at $ANCHOR (default /tmp/leagues-anchor-1b). The server parts need the
# serving dependencies the GPU machine lacks (fastapi, uvicorn, pydantic, httptools, and
# opentelemetry-api, which fastapi imports ...): carry them as wheels.
set -u
OUT=${OUT:-/tmp/leagues-bench}
ANCHOR=${ANCHOR:-/tmp/leagues-anchor-1b}
mkdir -p "$OUT"
python3 -c "from pathlib import Path; from benchmarks.step import make_anchor; make_anchor(Path('$ANCHOR'))" >/dev/null 2>&1

run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   rc=$? in $((SECONDS - start))s"
    grep -v -i warn "$OUT/$name.log" | tail -4
}

for part in "$@"; do
    case $part in
    tests) run tests 280 python3 -m pytest -q -m gpu tests -p no:cacheprovider --ignore=tests/serve \
        --ignore=tests/sync/test_serve_sync.py ;;  # those two need openai, which the GPU machine lacks
    tests-engine) run tests-engine 240 python3 -m pytest -q -m gpu tests/kernels tests/engine \
        tests/train/test_deterministic.py -p no:cacheprovider ;;
    step) run step 400 python3 benchmarks/step.py --workload anchor --impls trl,leagues --lens 128 --steps 8 \
        --model "$ANCHOR" ;;
    step1024) run step1024 200 python3 benchmarks/step.py --workload anchor --impls leagues --lens 1024 --steps 14 \
        --warmup 4 --model "$ANCHOR" -- --rollout.partial true --rollout.over_sample 0.5 ;;
    engine1024) run engine1024 200 python3 benchmarks/engine.py --shape anchor --batches 64 --new-tokens 1024 \
        --hf-batches '' --det-batches '' --no-parity ;;
    server) run server 250 python3 benchmarks/server.py --model "$ANCHOR" --clients 8,64 --stream both \
        --client-procs 8 ;;
    server-thread) run server-thread 250 python3 benchmarks/server.py --model "$ANCHOR" --clients 8,64 --stream both \
        --client-procs 8 --tag thread --engine_process false ;;
    server-mixed) run server-mixed 250 python3 benchmarks/server.py --model "$ANCHOR" --clients 8,64 --stream both \
        --client-procs 8 --tag mixed-steps --engine.mixed_steps true ;;
    server-interval) run server-interval 250 python3 benchmarks/server.py --model "$ANCHOR" --clients 8,64 --stream both \
        --client-procs 8 --tag stream-interval-4 --stream_interval 4 ;;
    server-fronts) run server-fronts 250 python3 benchmarks/server.py --model "$ANCHOR" --clients 8,64 --stream both \
        --client-procs 8 --tag fronts-4 --fronts 4 ;;
    server-admit) run server-admit 250 python3 benchmarks/server.py --model "$ANCHOR" --clients 8,64 --stream both \
        --client-procs 8 --tag admit-4 --engine.admit_after_decode_steps 4 ;;
    server-profile) run server-profile 250 python3 benchmarks/server.py --model "$ANCHOR" --clients 64 \
        --stream true --client-procs 8 --profile --tag profile ;;
    server-front) run server-front 150 python3 benchmarks/server_front.py --clients 8,64 --stream both \
        --client-procs 8 ;;
    prefill) run prefill 200 python3 benchmarks/prefill.py --batches 1,8,64 --lens 64,100 --profile ;;
    det) run det 330 python3 benchmarks/engine.py --shape anchor --batches 1,8,64,256 --new-tokens 128 \
        --hf-batches 64 --det-batches 1,8,64,256 --no-parity --out "$OUT/det.jsonl" ;;
    engine) run engine 300 python3 benchmarks/engine.py --shape anchor --batches 1,8,64,256 --new-tokens 128 ;;
    engine-blocks16) run engine-blocks16 200 python3 benchmarks/engine.py --shape anchor --batches 64,256 \
        --new-tokens 128 --hf-batches '' --det-batches '' --no-parity --moe-block-rows 16 \
        --out "$OUT/engine-blocks16.jsonl" ;;
    engine-wide) run engine-wide 300 python3 benchmarks/engine.py --shape wide --batches 1,8,64,256 \
        --new-tokens 128,1024 --hf-batches 64 --det-batches 1,64,256 --no-parity --out "$OUT/engine-wide.jsonl" ;;
    trainer-wide) run trainer-wide 200 torchrun --standalone --nproc_per_node 1 benchmarks/trainer.py --shape wide \
        --samples 8 --profile ;;
    sync) run sync 200 torchrun --standalone --nproc_per_node 1 benchmarks/sync.py --shapes anchor,wide --profile ;;
    moe-tune) run moe-tune 240 python3 benchmarks/moe_small_tune.py --kernels gate_up_tiled,down_tiled \
        --tiled-tokens 64,256 --out "$OUT/moe_tiled_tune.jsonl" ;;
    profile-engine) run profile-engine 170 python3 benchmarks/profile_engine.py --eager --compile-model true \
        --batch 1,64 --sort self_cuda_time_total ;;
    profile-host) run profile-host 200 python3 benchmarks/profile_engine.py --batch 64,256 --cprofile \
        --sort self_cuda_time_total ;;
    decode-tune) run decode-tune 220 python3 benchmarks/decode_tune.py ;;
    matmul-tiles) run matmul-tiles 150 python3 benchmarks/matmul_tiles.py --shapes 3 ;;
    profile-det) run profile-det 200 python3 benchmarks/profile_engine.py --batch 1,256 --deterministic ;;
    moe-tune-blocks) run moe-tune-blocks 240 python3 benchmarks/moe_small_tune.py --kernels gate_up_tiled,down_tiled \
        --shapes anchor --tiled-tokens 128,256 --block-k 64 --block-m 16,64 --out "$OUT/moe_tiled_tune.jsonl" ;;
    route-tune) run route-tune 150 python3 benchmarks/moe_small_tune.py --kernels route --shapes anchor \
        --tokens 1,8,64,256 --out "$OUT/route_tune.jsonl" ;;
    moe-tune-few) run moe-tune-few 200 python3 benchmarks/moe_small_tune.py --kernels gate_up_tiled,down_tiled \
        --shapes anchor --tiled-tokens 1,8 --block-k 64 --out "$OUT/moe_tiled_tune.jsonl" ;;
    engine-base) (cd "${BASE_TREE:?set BASE_TREE to a copy of the older tree}" && run engine-base 200 \
        env PYTHONPATH=. python3 benchmarks/engine.py --shape anchor --batches 1,64,256 --new-tokens 128 \
        --hf-batches '' --det-batches '' --no-parity --out "$OUT/engine-base.jsonl") ;;
    *) echo "unknown part: $part" ;;
    esac
done
