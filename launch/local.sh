#!/usr/bin/env bash
# The local main job: train a small GRIN MoE on this machine (CPU, or the GPU when there is one) in ~10 minutes.
#
#   bash launch/local.sh                        # corpus -> train (--config local) -> HF export -> samples
#   bash launch/local.sh --train-iters 100      # extra flags go to `megatron-grin pretrain` and win
#   RUN_DIR=runs/local/mine bash launch/local.sh   # run again with the same RUN_DIR to resume it
#
# Steps: (1) set up .venv (launch/env.sh); (2) write the Python standard library's sources as a JSONL corpus and
# tokenize it byte-level with `megatron-grin preprocess` (once, kept in runs/local/data); (3) `megatron-grin
# pretrain --config local` (megatron_grin/configs/local.yaml), stopping with a checkpoint after LOCAL_MINUTES (default 8) if the machine is
# slow; (4) export the checkpoint to Hugging Face (`megatron-grin convert to-hf`) and sample a few lines from it;
# (5) print where the checkpoint, the loss curve and the summary are.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# One process using every core (env.sh keeps an OMP_NUM_THREADS you set).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
# shellcheck source=launch/env.sh
source launch/env.sh

DATA_DIR="${DATA_DIR:-runs/local/data}"
RUN_DIR="${RUN_DIR:-runs/local/$(date +%Y%m%d-%H%M%S)}"
LOCAL_MINUTES="${LOCAL_MINUTES:-8}"
mkdir -p "$DATA_DIR" "$RUN_DIR"
say() { printf '\n[local.sh] %s\n' "$*"; }

# --- 1. corpus ---------------------------------------------------------------------------------------------
if [[ ! -f "$DATA_DIR/stdlib_text_document.idx" ]]; then
  say "building the corpus: the Python standard library's sources -> $DATA_DIR/stdlib_text_document.{bin,idx}"
  python -c "import sys; from megatron_grin.training.preprocess import stdlib_corpus; stdlib_corpus(sys.argv[1])" "$DATA_DIR"
  megatron-grin preprocess --input "$DATA_DIR/stdlib.jsonl" --output-prefix "$DATA_DIR/stdlib" --tokenizer byte
else
  say "reusing the corpus in $DATA_DIR"
fi

# --- 2. train ----------------------------------------------------------------------------------------------
device=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
say "training on $device with --config local -> $RUN_DIR (OMP_NUM_THREADS=$OMP_NUM_THREADS)"
start=$(date +%s)
megatron-grin pretrain --config local --data-path "$DATA_DIR/stdlib_text_document" \
  --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --log-dir "$RUN_DIR" \
  --tensorboard-dir "$RUN_DIR/tensorboard" --exit-duration-in-mins "$LOCAL_MINUTES" "$@"
train_seconds=$(( $(date +%s) - start ))

# --- 3. Hugging Face export and samples ----------------------------------------------------------------------
say "exporting to Hugging Face PhimoeForCausalLM -> $RUN_DIR/hf"
if megatron-grin convert to-hf --load "$RUN_DIR/checkpoints" --out "$RUN_DIR/hf" --force; then
  say "samples (temperature 0.8, byte-level, prompts from the corpus' style):"
  python - "$RUN_DIR/hf" <<'EOF' || echo "[local.sh] sampling failed (the export is still in $RUN_DIR/hf)"
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM

from megatron_grin.training.tokenizer import ByteTokenizer

warnings.filterwarnings("ignore", module=r"transformers\.")  # generation-config notices
tok = ByteTokenizer()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
torch.manual_seed(0)
for prompt in ("def ", "import os\n", "class "):
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=160, do_sample=True, temperature=0.8, top_k=40,
                         pad_token_id=tok.pad, eos_token_id=tok.eod)
    print("-" * 60)
    print(tok.decode(out[0].tolist()))
print("-" * 60)
EOF
else
  echo "[local.sh] HF export failed; the megatron checkpoint is unaffected"
fi

# --- 4. where things are -------------------------------------------------------------------------------------
python - "$RUN_DIR" "$train_seconds" <<'EOF'
import json
import os
import sys

run, seconds = sys.argv[1], int(sys.argv[2])
s = json.load(open(os.path.join(run, "summary.json")))
print()
print(f"[local.sh] done: {s['status']} at iteration {s['iteration']}/{s['train_iters']} in {seconds // 60}m{seconds % 60:02d}s"
      + (f" ({s['stop_reason']})" if s.get("stop_reason") else ""))
if s.get("first_loss") is not None:
    print(f"  loss          {s['first_loss']:.3f} (step {s['first_iteration']}) -> {s['last_loss']:.3f} "
          f"(step {s['last_iteration']})" + (f", validation {s['last_eval'][1]:.3f}" if s.get("last_eval") else ""))
if s.get("tokens_per_second"):
    print(f"  throughput    {s['tokens_per_second']:,.0f} tokens/s, MFU {s['mfu_mean'] or 0:.1%} ({s['peak_source']})")
print(f"  checkpoint    {s.get('checkpoint')}")
print(f"  loss curve    {s.get('loss_curve')}")
print(f"  summary       {os.path.join(run, 'summary.json')}")
if os.path.isdir(os.path.join(run, "hf")):
    print(f"  HF export     {os.path.join(run, 'hf')}")
print(f"  tensorboard   tensorboard --logdir {os.path.join(run, 'tensorboard')}")
EOF
