#!/usr/bin/env bash
# Submit a Parquet job to an existing Ray cluster with deploy/runtime_env.yaml (this checkout's code as the job's
# working directory; the cluster's nodes run IMAGE below, or have the same packages, and mount the models at /models).
#
# usage: RAY_ADDRESS=http://HEAD:8265 deploy/submit.sh INPUT OUTPUT [more `phi3-batch run` flags]
#   RAY_ADDRESS=http://ray-head.ray.svc:8265 deploy/submit.sh s3://bucket/prompts/ s3://bucket/out/ --max-new-tokens 128
# Flags given after OUTPUT win over the defaults below (`--actors 2` replaces `--actors auto`).
# env: MODEL (default hf://microsoft/Phi-3-mini-4k-instruct, resolved on the cluster), GPUS_PER_ACTOR (default 1),
#      SUBMISSION_ID (default phi3-batch-<UTC time>), DRY_RUN=1: print the command instead of running it.
# `ray job submit` follows the driver's log; Ctrl-C stops following, not the job (`ray job stop ID` stops it).
set -euo pipefail

IMAGE=registry.example.com/phi3-batch:0.1.0
MODEL=${MODEL:-hf://microsoft/Phi-3-mini-4k-instruct}
GPUS_PER_ACTOR=${GPUS_PER_ACTOR:-1}

if [[ $# -lt 2 ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    echo "cluster image: $IMAGE" >&2
    exit 2
fi
input=$1 output=$2
shift 2
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://ray-head:8265}"

cd "$(dirname "$0")/.."   # runtime_env.yaml's working_dir "." is the repository root
cmd=(ray job submit --address "$RAY_ADDRESS" --runtime-env deploy/runtime_env.yaml
     --submission-id "${SUBMISSION_ID:-phi3-batch-$(date -u +%Y%m%d-%H%M%S)}"
     --
     phi3-batch run --input "$input" --output "$output" --model "$MODEL"
     --backend vllm --dtype bfloat16 --actors auto --gpus-per-actor "$GPUS_PER_ACTOR"
     --address auto --progress log "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
