#!/usr/bin/env bash
# distill convert over N GPUs of one node (torchrun, NCCL), against one GPU:
#
#   bash benchmarks/gpu_distributed.sh [OUT]          # OUT defaults to runs/dist-gpu; N = visible GPUs
#   MODEL=/path/to/Meta-Llama-3-8B bash benchmarks/gpu_distributed.sh   # also the 8B step
#
# 1. the demo model (offline), configs/demo-cpu.yaml with device=cuda, once on 1 GPU and once on N:
#    student inputs (each layer data parallel) and teacher inputs (a block of layers per rank).
#    The N-GPU student must match the 1-GPU one: held-out perplexity within 0.5% (GPU matmuls run in
#    TF32, and the sums over ranks change the rounding). Then student inputs again on N GPUs with
#    fsdp=true (the teacher sharded over the ranks), checked against the same 1-GPU student and
#    tolerance, with each rank's share of the weights (report.json "weights_gib_per_rank").
#    Under 12 minutes on H100/H200.
# 2. with MODEL set (a local folder or hub id of Llama 3 8B): configs/llama-3-8b-8gpu.yaml shortened
#    to 50 transfer and 50 finetune steps on N GPUs, to measure what the full config costs (its data
#    streams fineweb-edu from the hub: run it with HF_HUB_OFFLINE=0 where the hub is reachable).
# Each step prints, from report.json: seconds per stage, transfer and finetune tokens/s per GPU and
# the peak GPU memory of every rank (report.json "peak_gpu_gib"); OUT/summary.md collects them.
# 3. with MODEL70 set (Llama 3.1 70B; 8 GPUs of 80 GB): configs/llama-3.1-70b-8gpu.yaml (fsdp) shortened
#    to 20 transfer and 20 finetune steps: the peak memory per GPU against the estimate in its header.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/dist-gpu}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
N=${N:-$(nvidia-smi -L | wc -l)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

convert() {  # convert RANKS OUTDIR ARGS...
    local ranks=$1 out=$2; shift 2
    if [ "$ranks" = 1 ]; then
        "$PY" -m distill convert "$@" --out "$out" --overwrite
    else
        "$PY" -m torch.distributed.run --standalone --nproc-per-node "$ranks" -m distill convert "$@" --out "$out" --overwrite
    fi
}

summary() {  # summary OUTDIR...: one Markdown row per run
    "$PY" - "$@" <<'EOF'
import json, sys
for out in sys.argv[1:]:
    r = json.load(open(f"{out}/report.json"))
    s, t, ranks = r["seconds"], r["tokens_by_stage"], r.get("ranks", 1)
    rate = lambda k: f"{t[k] / s[k] / ranks:.0f}" if s.get(k) else "-"
    peaks = ", ".join(f"{g:.1f}" for g in r.get("peak_gpu_gib") or [])
    print(f"| {out} | {ranks} | {s['total']:.0f} | {s.get('transfer', 0):.0f} | {rate('transfer')} | "
          f"{s.get('finetune', 0):.0f} | {rate('finetune')} | {r['student_ppl']:.4f} | {peaks} |")
EOF
}

{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    echo "| run | ranks | total s | transfer s | transfer tok/s/GPU | finetune s | finetune tok/s/GPU | student ppl | peak GiB per rank |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
} | tee "$OUT/summary.md"

for inputs in student teacher; do
    for ranks in 1 "$N"; do
        convert "$ranks" "$OUT/demo-$inputs-$ranks" demo --config configs/demo-cpu.yaml device=cuda \
            "transfer.inputs=$inputs" > "$OUT/demo-$inputs-$ranks.log" 2>&1 || { echo "FAILED: see $OUT/demo-$inputs-$ranks.log"; exit 1; }
    done
    summary "$OUT/demo-$inputs-1" "$OUT/demo-$inputs-$N" | tee -a "$OUT/summary.md"
    "$PY" - "$OUT/demo-$inputs-1" "$OUT/demo-$inputs-$N" <<'EOF' || exit 1
import json, sys
a, b = (json.load(open(f"{d}/report.json"))["student_ppl"] for d in sys.argv[1:])
ok = abs(a - b) <= 0.005 * a
print(f"student ppl 1 GPU {a:.4f}, N GPUs {b:.4f}: {'OK' if ok else 'MISMATCH'} (tolerance 0.5%)")
sys.exit(0 if ok else 1)
EOF
done

convert "$N" "$OUT/demo-fsdp-$N" demo --config configs/demo-cpu.yaml device=cuda transfer.inputs=student fsdp=true \
    > "$OUT/demo-fsdp-$N.log" 2>&1 || { echo "FAILED: see $OUT/demo-fsdp-$N.log"; exit 1; }
summary "$OUT/demo-fsdp-$N" | tee -a "$OUT/summary.md"
"$PY" - "$OUT/demo-student-1" "$OUT/demo-fsdp-$N" <<'EOF' || exit 1
import json, sys
a, b = (json.load(open(f"{d}/report.json")) for d in sys.argv[1:])
ok = abs(a["student_ppl"] - b["student_ppl"]) <= 0.005 * a["student_ppl"]
print(f"fsdp: student ppl 1 GPU {a['student_ppl']:.4f}, N GPUs sharded {b['student_ppl']:.4f}: {'OK' if ok else 'MISMATCH'} "
      f"(tolerance 0.5%); weights GiB per rank {b['weights_gib_per_rank']}")
sys.exit(0 if ok else 1)
EOF

if [ -n "${MODEL:-}" ]; then
    convert "$N" "$OUT/llama-3-8b" "$MODEL" --config configs/llama-3-8b-8gpu.yaml transfer.steps=50 finetune.steps=50 \
        calib_tokens=4194304 > "$OUT/llama-3-8b.log" 2>&1 || { echo "FAILED: see $OUT/llama-3-8b.log"; exit 1; }
    summary "$OUT/llama-3-8b" | tee -a "$OUT/summary.md"
fi

if [ -n "${MODEL70:-}" ]; then
    convert "$N" "$OUT/llama-3.1-70b" "$MODEL70" --config configs/llama-3.1-70b-8gpu.yaml transfer.steps=20 finetune.steps=20 \
        calib_tokens=1048576 > "$OUT/llama-3.1-70b.log" 2>&1 || { echo "FAILED: see $OUT/llama-3.1-70b.log"; exit 1; }
    summary "$OUT/llama-3.1-70b" | tee -a "$OUT/summary.md"
fi
