#!/usr/bin/env bash
# Runs the GPU benchmarks on the lent H200, in stages that fit the device tool's limits (see bench/README.md).
#   stage1: park the first half of the default model's GGUF outside the tree (carry .model/gguf.part00)
#   stage2: join the second half (carry .model/gguf.part01 .whl .data), convert once, run decode + mtp benches
#   peers: the same join, then the plain decoding rows with both decoding peers (HF static cache, gpt-fast style)
#   stage2inv: the same join, then the GPU tests and the Medusa / MTP benches with Engine(invariant=True)
#   stage3: training + E2E benches (the machine is still warm, /tmp/ft stays)
#   drafters, specbench-all, specbench-t1: EAGLE-3 / Medusa / MTP trained on one Magpie set (and the GEMV kernel
#     unless SKIP_GEMV=1); then Spec-Bench greedy (all 240 prompts) and at temperature 1 (3 per category)
#   walk: the CLI as a user runs it (finetune, generate, train-heads --method eagle3, export-heads), make gpu-check
#   decode-train: the plain decoding rows with the GEMV column and the peers, the training bench with Liger
#   stage4: the fine-tuning path: finetune on a chat JSONL (no device flag), bench/finetune.py (TRL peer), bench/e2e.py
# Every bench writes bench/results/*.json; copies land in $OUT. One failing bench does not stop the others.
set -u
stage=${1:?stage1|stage2|peers|stage2inv|check-invariant|stage3|stage4|drafters|specbench-all|specbench-t1|walk|decode-train}
FT=/tmp/ft
mkdir -p "$FT" "${OUT:=/tmp/out}"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export FLASHTUNE_GGUF=$FT/SmolLM2-135M-Instruct.Q4_1.gguf FLASHTUNE_CACHE=$FT/cache
export FLASHTUNE_E2E_DATA=$FT/devel-fixed.no-ol.csv
export FLASHTUNE_SPECBENCH_DATA=${FLASHTUNE_SPECBENCH_DATA:-$PWD/.data/question.dev.jsonl}  # carried in .data
# .whl holds what the GPU image lacks: gguf (the default model's file), rouge-score (an sdist) and nltk.
#   pip download --no-deps -d .whl gguf==0.19.0 rouge-score==0.1.2 nltk
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target "$FT/site" .whl/*; fi
[ -d "$FT/site" ] && export PYTHONPATH=$PYTHONPATH:$FT/site

join_model() {  # the default model's GGUF from its two halves (part00 parked by stage1)
  [ -f "$FLASHTUNE_GGUF" ] || { cp .model/gguf.part01 "$FT/" && cat "$FT/gguf.part00" "$FT/gguf.part01" > "$FLASHTUNE_GGUF"; }
  md5sum "$FLASHTUNE_GGUF"
}

chat_jsonl() {  # the E2E development CSV (carried in .data) as a chat JSONL, the data a user brings: $FT/e2e_chat.jsonl
  cp .data/devel-fixed.no-ol.csv "$FLASHTUNE_E2E_DATA"
  python3 -c "
import csv, json
rows = list(csv.DictReader(open('$FLASHTUNE_E2E_DATA', encoding='utf-8')))
with open('$FT/e2e_chat.jsonl', 'w') as f:
    for r in rows:
        msgs = [{'role': 'user', 'content': 'Describe this restaurant in plain English: ' + r['mr']},
                {'role': 'assistant', 'content': r['ref']}]
        f.write(json.dumps({'messages': msgs}) + '\\n')
print(len(rows), 'chat rows')"
}

run() {  # run NAME SECONDS CMD...: time-boxed, logged to $OUT, never fatal
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s) $(date +%T)"
  timeout --signal=INT --kill-after=15 "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? $(date +%T)"; tail -n 25 "$OUT/$name.log"
}
collect() { cp bench/results/*.json "$OUT/" 2>/dev/null; ls -la "$OUT"; }

case $stage in
stage1)
  cp .model/gguf.part00 "$FT/" && ls -la "$FT"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  ;;
stage2)
  join_model
  cp .data/devel-fixed.no-ol.csv "$FLASHTUNE_E2E_DATA"
  python3 -c "from flashtune.models import load_base_model; m,t=load_base_model(); print('default model ok', sum(p.numel() for p in m.parameters()))"
  run decode 270 python3 bench/decode.py --device cuda --no-peers
  run mtp 180 python3 bench/mtp.py --device cuda --budget 150 --depth 2
  run profile 100 python3 bench/profile_decode.py --out bench/results
  mkdir -p "$OUT/bench_mtp" && cp -r runs/bench_mtp/lora_adapter runs/bench_mtp/mtp "$OUT/bench_mtp/" 2>/dev/null
  collect ;;
peers)  # the peers compile (HF's static-cache forward and the gpt-fast step, per model and batch): ~6-9 min;
  # the 1.1B rows run first and the file is rewritten after each model, so a cut-short run keeps them
  join_model
  run decode-peers 540 python3 bench/decode.py --device cuda --parts plain --models 1b,smollm2 \
      --out bench/results/decode-peers.json
  cp bench/results/decode-peers.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
stage2inv)  # like stage2, for the batch-invariant kernels: GPU tests, then Medusa and MTP with Engine(invariant=True)
  join_model
  cp .data/devel-fixed.no-ol.csv "$FLASHTUNE_E2E_DATA"
  run gpu-tests 120 python3 -m pytest -q -m gpu tests/test_decode_kernels.py tests/test_decoding.py -s
  run decode-invariant 200 python3 bench/decode.py --device cuda --parts medusa --invariant --out bench/results/decode-invariant.json
  run mtp-invariant 200 python3 bench/mtp.py --device cuda --budget 170 --depth 2 --invariant --out bench/results/mtp-invariant.json
  cp bench/results/decode-invariant.json bench/results/mtp-invariant.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
stage4)  # the fine-tuning path: `finetune --data chats.jsonl` with no device flag, the TRL peer, the E2E recipe
  join_model
  chat_jsonl
  # STAGE4_SECS="jsonl bench e2e" seconds for each part (0 skips it), to fit what is left of the device time
  read -r s_jsonl s_bench s_e2e <<< "${STAGE4_SECS:-100 210 230}"
  [ "$s_jsonl" -gt 0 ] && run finetune-jsonl "$s_jsonl" python3 -m flashtune finetune --data "$FT/e2e_chat.jsonl" \
      --out "$FT/run-jsonl" --max-steps 60 --batch-size 32 --set eval.max_inputs=0
  cp "$FT/run-jsonl/finetune.json" "$OUT/finetune-jsonl-config.json" 2>/dev/null
  [ "$s_bench" -gt 0 ] && run finetune-bench "$s_bench" python3 bench/finetune.py --steps "${BENCH_STEPS:-120}" \
      --rows "${BENCH_ROWS:-flashtune,flashtune-no-compile,trl,trl-defaults}"
  [ "$s_e2e" -gt 0 ] && run e2e "$s_e2e" python3 bench/e2e.py --device cuda --methods lora
  cp bench/results/finetune-h200.json bench/results/e2e.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
drafters)  # after stage1 (carry .model/gguf.part01 .whl .data): EAGLE-3, Medusa and MTP trained on one Magpie set
  # into /tmp/ft (kept while the machine stays warm, for `specbench-all` next), then the GEMV kernel's GPU tests
  # and its benchmark
  join_model
  # (a JSON default inside ${VAR:-...} would end at its first closing brace: set the defaults apart)
  EAGLE_TRAIN=${EAGLE_TRAIN:-'{"num_prompts": 768, "answer_tokens": 192, "steps": 1200}'}
  HEADS_TRAIN=${HEADS_TRAIN:-'{"steps": 600}'}
  # the EAGLE-3 GPU test first (fused draft layer under CUDA graphs): a broken drafter stops before training
  run eagle-gpu-test 90 python3 -m pytest -q -m gpu tests/test_eagle.py
  run drafters-train "${DRAFTERS_SECS:-300}" python3 bench/specbench.py --eagle "$FT/eagle3" --medusa "$FT/medusa" --mtp "$FT/mtp" \
      --train-eagle "$EAGLE_TRAIN" --train-heads "$HEADS_TRAIN" --train-only --out bench/results/specbench-h200.json
  [ -n "${SKIP_GEMV:-}" ] || run gemv-tests 90 python3 -m pytest -q -x tests/test_gemv.py
  [ -n "${SKIP_GEMV:-}" ] || run gemv 150 python3 bench/gemv.py
  cp bench/results/specbench-training.json "$FT/eagle3/eagle3_report.json" "$OUT/" 2>/dev/null
  cp "$FT/medusa/heads_report.json" "$OUT/medusa_report.json" 2>/dev/null
  cp "$FT/mtp/heads_report.json" "$OUT/mtp_report.json" 2>/dev/null
  cp bench/results/gemv-h200.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
specbench-all)  # right after `drafters` (same warm machine): all 240 prompts, every drafter, batch 1 and 8, greedy;
  # then the fused draft layer against the PyTorch one on a few prompts
  run specbench "${SPEC_SECS:-420}" python3 bench/specbench.py --eagle "$FT/eagle3" --medusa "$FT/medusa" --mtp "$FT/mtp" \
      --temperatures 0 ${SPEC_ARGS:-} --out bench/results/specbench-h200.json
  run specbench-layer "${LAYER_SECS:-100}" python3 bench/specbench.py --eagle "$FT/eagle3" --reference-layer \
      --per-category 2 --batch-sizes 1 --temperatures 0 --out bench/results/specbench-layer-h200.json
  cp bench/results/specbench-h200.json bench/results/specbench-layer-h200.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
specbench-t1)  # temperature 1 (sampled verification, the target pass alone graphed): 3 prompts per category
  run specbench-t1 "${SPEC_SECS:-420}" python3 bench/specbench.py --eagle "$FT/eagle3" --medusa "$FT/medusa" --mtp "$FT/mtp" \
      --temperatures 1 --per-category "${T1_PER_CATEGORY:-3}" ${SPEC_ARGS:-} --out bench/results/specbench-t1-h200.json
  cp bench/results/specbench-t1-h200.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
walk)  # a user's path through the CLI on the GPU (no device flags): fine-tune on a chat JSONL and generate with the
  # adapter; train an EAGLE-3 draft and export it; generate with the big draft from `drafters` (chain and tree);
  # export it for vLLM; then `make gpu-check` (GPU tests, native kernel tests, attention check)
  join_model
  chat_jsonl
  Q='Explain in two sentences why the sky is blue.'
  run walk-finetune 150 python3 -m flashtune finetune --data "$FT/e2e_chat.jsonl" --out "$FT/walk-ft" --max-steps 60 \
      --batch-size 32 --set eval.max_inputs=0
  run walk-generate-adapter 60 python3 -m flashtune generate --adapter "$FT/walk-ft/adapter" \
      --prompt 'Describe this restaurant in plain English: name[The Eagle], eatType[coffee shop], area[riverside]'
  run walk-train-eagle3 150 python3 -m flashtune train-heads --method eagle3 --out "$FT/walk-eagle3" --num-prompts 256 \
      --steps 200 --export speculators
  run walk-generate-chain 60 python3 -m flashtune generate --speculative eagle3 --heads "$FT/eagle3" --prompt "$Q"
  run walk-generate-tree 60 python3 -m flashtune generate --speculative eagle3 --heads "$FT/eagle3" --tree 48 --prompt "$Q"
  run walk-export 60 python3 -m flashtune export-heads --heads "$FT/eagle3" --format vllm --out "$FT/export-vllm"
  run gpu-check "${CHECK_SECS:-200}" make gpu-check PY=python3
  ls -R "$FT/walk-eagle3/export" "$FT/export-vllm" > "$OUT/walk-files.txt" 2>&1; ls -la "$OUT" ;;
check-invariant)  # after stage1 (carry .model/gguf.part01 .whl .data): make gpu-check, then MTP and Medusa with the
  # batch-invariant kernels against the invariant plain engine and the default one, in the same run
  join_model
  cp .data/devel-fixed.no-ol.csv "$FLASHTUNE_E2E_DATA"
  run gpu-check "${CHECK_SECS:-200}" make gpu-check PY=python3
  run mtp-invariant "${MTP_SECS:-220}" python3 bench/mtp.py --device cuda --budget 190 --depth 2 --invariant \
      --out bench/results/mtp-invariant.json
  cp bench/results/mtp-invariant.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
decode-train)  # the plain decoding rows on the 1.1B shape with the GEMV column and both peers, then the LoRA
  # training bench with the PEFT + Liger peer (carry .whl .data)
  cp .data/devel-fixed.no-ol.csv "$FLASHTUNE_E2E_DATA"
  run decode-peers "${DECODE_SECS:-300}" python3 bench/decode.py --device cuda --parts plain --models "${DECODE_MODELS:-1b}" \
      --out bench/results/decode-peers.json
  run train "${TRAIN_SECS:-200}" python3 bench/train.py --budget-s 140
  cp bench/results/decode-peers.json bench/results/train.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
stage3)
  run train 200 python3 bench/train.py --budget-s 140
  run e2e 260 python3 bench/e2e.py --device cuda --batch-size 48 --epochs 1.5 --warmup 10
  collect ;;
esac
