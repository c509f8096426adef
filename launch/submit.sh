#!/usr/bin/env bash
# submit.sh: submit GRIN pretraining to Slurm (launch/grin.sbatch), or print what would run (--dry-run).
#
#   launch/submit.sh --preset h100x64 -- --data-path /data/grin/corpus      # 8 nodes x 8 H100
#   launch/submit.sh --preset h100x512 --dry-run                            # review, submit nothing
#   launch/submit.sh --nodes 2 --gpus-per-node 2 --cpu --name smoke -- --model-preset test --mock-data
#
# Presets are megatron_grin/configs/cluster/NAME.yaml: h100x64, h100x128, h100x256, h100x512 (8/16/32/64 nodes x 8 H100).
# With a preset the trainer gets --config RUN_DIR/config.yaml (the model file, then the recipe file, merged)
# plus the preset's parallel layout as flags; everything after `--` is passed to the trainer last, so it wins.
#
# Options:
#   --preset NAME|FILE   cluster layout (a name above or a YAML path)
#   --nodes N            nodes (default: the preset's, else 1)
#   --gpus-per-node N    ranks per node (default: the preset's, else 8)
#   --cpu                request no GPUs (gloo on CPU: smoke tests, the Slurm test suite)
#   --mode MODE          torchrun (default: one torchrun per node) | srun (one Slurm task per rank)
#   --name NAME          job name (default: grin-PRESET, else grin); --singleton chains jobs of this name
#   --run-dir DIR        run directory (default: runs/NAME); a later job with the same one resumes it
#   --model FILE         model config (default with a preset: megatron_grin/configs/grin-16x3.8b.yaml)
#   --recipe FILE        training recipe (default with a preset: megatron_grin/configs/pretrain-grin.yaml)
#   --time T             time limit, e.g. 24:00:00 (default: grin.sbatch's 04:00:00)
#   --grace S            SIGUSR1 this many seconds before the time limit (default 600)
#   --singleton          start only after earlier jobs of the same name and user have ended
#   --chain K            submit K jobs, each --dependency=singleton on the one before (implies --singleton)
#   --no-requeue         on SIGUSR1 save and end instead of requeueing (use with --chain)
#   --container IMAGE    run the ranks in a pyxis container (CONTAINER_MOUNTS adds mounts)
#   --sbatch-arg ARG     extra sbatch option, repeatable (e.g. --sbatch-arg=--partition=gpu)
#   --dry-run            print the sbatch command and the srun command the job will run; submit nothing
# Environment: SITE_ENV (site file, default launch/site.env), PYTHON (with PyYAML, for presets), and the
# variables grin.sbatch documents (TRAIN_CMD, MASTER_PORT, MAX_REQUEUES, CONTAINER_MOUNTS).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

GRIN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "submit.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

preset="" nodes="" gpus="" cpu=0 mode=torchrun name="" run_dir="" model="" recipe="" time_limit="" grace=""
singleton=0 chain=1 requeue=1 container=${CONTAINER_IMAGE:-} dry_run=0
extra_sbatch=() trainer_args=()
while (( $# )); do
  opt=$1 val=""
  case $opt in
    --*=*) val=${opt#*=} opt=${opt%%=*} ;;
    --preset|--nodes|--gpus-per-node|--mode|--name|--run-dir|--model|--recipe|--time|--grace|--chain|\
    --container|--sbatch-arg)
      (( $# >= 2 )) || die "$opt needs a value"
      val=$2; shift ;;
  esac
  case $opt in
    --preset) preset=$val ;;
    --nodes) nodes=$val ;;
    --gpus-per-node) gpus=$val ;;
    --cpu) cpu=1 ;;
    --mode) mode=$val ;;
    --name) name=$val ;;
    --run-dir) run_dir=$val ;;
    --model) model=$val ;;
    --recipe) recipe=$val ;;
    --time) time_limit=$val ;;
    --grace) grace=$val ;;
    --singleton) singleton=1 ;;
    --chain) chain=$val singleton=1 ;;
    --no-requeue) requeue=0 ;;
    --container) container=$val ;;
    --sbatch-arg) extra_sbatch+=("$val") ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; trainer_args=("$@"); break ;;
    *) die "unknown option $opt (trainer flags go after --; see --help)" ;;
  esac
  shift
done
[[ $mode == torchrun || $mode == srun ]] || die "--mode $mode: use torchrun or srun"
[[ $chain =~ ^[1-9][0-9]*$ ]] || die "--chain $chain: give a positive count"

SITE_ENV=${SITE_ENV:-$GRIN_ROOT/launch/site.env}
[[ -f $SITE_ENV ]] || die "site environment file $SITE_ENV not found (SITE_ENV)"
# shellcheck source=site.env
source "$SITE_ENV"

# --- preset and configs (YAML, read with Python) -------------------------------------------------------
python_bin() {
  local py
  for py in "${PYTHON:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$GRIN_ROOT/.venv/bin/python" python3; do
    [[ -n $py ]] && command -v "$py" > /dev/null && "$py" -c 'import yaml' 2> /dev/null && { echo "$py"; return; }
  done
  die "presets need Python with PyYAML: run 'source launch/env.sh' first, or set PYTHON"
}

layout_flags=() summary=""
if [[ -n $preset ]]; then
  cluster_yaml=$preset
  [[ -f $cluster_yaml ]] || cluster_yaml=$GRIN_ROOT/megatron_grin/configs/cluster/$preset.yaml
  if [[ ! -f $cluster_yaml ]]; then
    known=("$GRIN_ROOT"/megatron_grin/configs/cluster/*.yaml)
    known=("${known[@]##*/}")
    die "no preset $preset; known: ${known[*]%.yaml}"
  fi
  preset=$(basename "$cluster_yaml" .yaml)
  model=${model:-$GRIN_ROOT/megatron_grin/configs/grin-16x3.8b.yaml}
  recipe=${recipe:-$GRIN_ROOT/megatron_grin/configs/pretrain-grin.yaml}
fi
name=${name:-grin${preset:+-$preset}}
run_dir=$(realpath -m -- "${run_dir:-$GRIN_ROOT/runs/$name}")
config_args=() merged_yaml=""
if [[ -n $preset || -n $model || -n $recipe ]]; then
  # Prints shell assignments (shlex-quoted): preset sizes, layout flags, the merged config, a layout summary.
  py=$(python_bin)
  resolved=$("$py" - "${cluster_yaml:-}" "$model" "$recipe" "$nodes" "$gpus" \
             ${trainer_args[@]+"${trainer_args[@]}"} <<'PY'
import shlex, sys, yaml

cluster_file, model_file, recipe_file, nodes, gpus, *extra = sys.argv[1:]

def load(path):
    if not path:
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        sys.exit(f"submit.sh: {path} is not a YAML mapping")
    return data

cluster = load(cluster_file)
unknown = set(cluster) - {"slurm", "trainer"}
if unknown:
    sys.exit(f"submit.sh: {cluster_file}: unknown sections {sorted(unknown)} (use slurm: and trainer:)")
slurm, layout = cluster.get("slurm") or {}, cluster.get("trainer") or {}
if set(slurm) - {"nodes", "gpus_per_node"}:
    sys.exit(f"submit.sh: {cluster_file}: slurm: takes nodes and gpus_per_node (other sbatch options: "
             "--sbatch-arg)")
merged = {**load(model_file), **load(recipe_file)}
nodes = int(nodes or slurm.get("nodes", 1))
gpus = int(gpus or slurm.get("gpus_per_node", 8))

flags = []
for key, value in layout.items():
    flag = "--" + key.replace("_", "-")
    if value is True:
        flags.append(flag)
    elif value is not False and value is not None:
        flags += [flag, str(value)]

# Effective settings: config, then preset flags, then the user's trainer flags (last one wins).
def effective(key, default=None):
    value = layout.get(key, merged.get(key, default))
    flag = "--" + key.replace("_", "-")
    for i, arg in enumerate(extra):
        if arg == flag and i + 1 < len(extra):
            value = extra[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value

world = nodes * gpus
tp, pp = int(effective("tensor_model_parallel_size", 1)), int(effective("pipeline_model_parallel_size", 1))
mbs, gbs = int(effective("micro_batch_size", 1)), effective("global_batch_size")
layers, per_chunk = effective("num_layers"), effective("num_layers_per_virtual_pipeline_stage")
errors = []
if world % (tp * pp):
    errors.append(f"{world} ranks are not divisible by TP {tp} x PP {pp}")
dp = world // (tp * pp) or 1
summary = f"{nodes} nodes x {gpus} = {world} ranks: TP {tp} x PP {pp} x DP {dp}"
vpp = None
if layers is not None and int(layers) % pp:
    errors.append(f"num_layers {layers} is not divisible by PP {pp}")
elif layers is not None and per_chunk is not None:
    if (int(layers) // pp) % int(per_chunk):
        errors.append(f"{int(layers) // pp} layers per stage do not split into chunks of {per_chunk}")
    else:
        vpp = int(layers) // pp // int(per_chunk)
        summary += f" (VPP {vpp})"
if gbs is not None:
    gbs = int(gbs)
    if gbs % (mbs * dp):
        errors.append(f"global batch {gbs} is not divisible by micro-batch {mbs} x DP {dp}")
    else:
        m = gbs // (mbs * dp)
        summary += f"; global batch {gbs} = micro {mbs} x DP {dp} x {m} microbatches"
        if pp > 1:
            bubble = (pp - 1) / ((vpp or 1) * m)
            summary += f"; pipeline bubble (PP-1)/(VPP*m) = {100 * bubble:.1f}%"
            if vpp and vpp > 1 and m % pp:
                errors.append(f"the interleaved schedule needs microbatches ({m}) divisible by PP {pp}")
if errors:
    sys.exit("submit.sh: layout does not fit: " + "; ".join(errors))

print(f"nodes={nodes} gpus={gpus}")
print("layout_flags=(" + " ".join(shlex.quote(f) for f in flags) + ")")
print("summary=" + shlex.quote(summary))
header = "".join(f"# from {p}\n" for p in (model_file, recipe_file) if p)
body = yaml.safe_dump(merged, sort_keys=False, default_flow_style=False) if merged else ""
print("merged_yaml=" + shlex.quote(header + body))
PY
)
  eval "$resolved"
  if [[ -n $model || -n $recipe ]]; then
    config_args=(--config "$run_dir/config.yaml")
  fi
fi
nodes=${nodes:-1} gpus=${gpus:-8}

# A preset run without data would wait in the queue only to fail at start-up.
data_given=0
for arg in ${trainer_args[@]+"${trainer_args[@]}"}; do
  [[ $arg == --data-path* || $arg == --mock-data ]] && data_given=1
done
grep -qE '^(data_path|mock_data):' <<< "$merged_yaml" && data_given=1
if [[ -n $preset ]] && (( !data_given )); then
  msg="no training data: add '-- --data-path PREFIX' (or '-- --mock-data' for a throughput run)"
  if (( dry_run )); then echo "# NOTE: $msg"; else die "$msg"; fi
fi

# --- the submission ---------------------------------------------------------------------------------
sbatch_args=(--job-name="$name" --nodes="$nodes" --chdir="$run_dir")
if [[ $mode == srun ]]; then
  sbatch_args+=(--ntasks-per-node="$gpus")
else
  sbatch_args+=(--ntasks-per-node=1)
fi
if (( cpu )); then
  sbatch_args+=(--gpus-per-node=0)
else
  sbatch_args+=(--gpus-per-node="$gpus")
fi
[[ -n $time_limit ]] && sbatch_args+=(--time="$time_limit")
[[ -n $grace ]] && sbatch_args+=(--signal=B:USR1@"$grace")
(( singleton )) && sbatch_args+=(--dependency=singleton)
(( requeue )) || sbatch_args+=(--no-requeue)
sbatch_args+=(${extra_sbatch[@]+"${extra_sbatch[@]}"})
job_args=(${config_args[@]+"${config_args[@]}"} ${layout_flags[@]+"${layout_flags[@]}"}
          ${trainer_args[@]+"${trainer_args[@]}"})
job_env=(GRIN_ROOT="$GRIN_ROOT" RUN_DIR="$run_dir" LAUNCH_MODE="$mode" GPUS_PER_NODE="$gpus"
         REQUEUE="$requeue" SITE_ENV="$SITE_ENV")
[[ -n $container ]] && job_env+=(CONTAINER_IMAGE="$container")

if (( dry_run )); then
  echo "# layout: ${summary:-(no preset)}"
  if [[ -n $merged_yaml ]]; then
    echo "# $run_dir/config.yaml, written at submission:"
    printf '%s' "$merged_yaml" | sed 's/^/#   /'
  fi
  (( chain > 1 )) && echo "# submitted $chain times; each job waits for the previous one (--dependency=singleton)"
  echo "# submit:"
  printf 'env'; printf ' %q' "${job_env[@]}"
  printf ' \\\n  sbatch'; printf ' %q' "${sbatch_args[@]}"
  printf ' \\\n  %q' "$GRIN_ROOT/launch/grin.sbatch"; printf ' %q' ${job_args[@]+"${job_args[@]}"}
  printf '\n# on the first node of the allocation, grin.sbatch runs:\n'
  env "${job_env[@]}" GRIN_DRY_RUN=1 SLURM_JOB_NUM_NODES="$nodes" \
    bash "$GRIN_ROOT/launch/grin.sbatch" ${job_args[@]+"${job_args[@]}"}
  exit 0
fi

mkdir -p "$run_dir/logs"
[[ -n $merged_yaml ]] && printf '%s' "$merged_yaml" > "$run_dir/config.yaml"
[[ -n $summary ]] && echo "layout: $summary"
for (( i = 0; i < chain; i++ )); do
  job=$(env "${job_env[@]}" sbatch --parsable "${sbatch_args[@]}" "$GRIN_ROOT/launch/grin.sbatch" \
        ${job_args[@]+"${job_args[@]}"})
  echo "submitted job ${job%%;*} ($name) -> $run_dir/logs/$name-${job%%;*}.out"
done
