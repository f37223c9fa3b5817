#!/usr/bin/env bash
# Launch the DELF index build (python -m pipeline.run) on Google Cloud Dataflow with GPU workers.
#
# Workers run the container built from ./Dockerfile (CUDA TensorFlow + the pinned Beam SDK); the
# project reaches them as an sdist of ./setup.py. The GPU is attached with the worker_accelerator
# service option, and the extraction step also carries the matching Beam resource hint.
# Prints the job's console URL; --dry-run prints the command instead of running it.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $0 --input SRC --output gs://BUCKET/index [options]

  --project ID         GCP project            (env GCP_PROJECT)
  --region REGION      Dataflow region        (env GCP_REGION, default us-central1)
  --bucket NAME        staging/temp bucket    (env GCS_BUCKET)
  --gpu-type TYPE      e.g. nvidia-tesla-t4   (env GPU_TYPE, default nvidia-tesla-t4)
  --gpu-count N        GPUs per worker        (env GPU_COUNT, default 1)
  --machine-type TYPE  worker machine         (env MACHINE_TYPE, default n1-standard-8)
  --image URI          worker container image (env WORKER_IMAGE)
  --max-workers N      autoscaling limit      (env MAX_WORKERS, default 50)
  --wait               wait for the job and print the index summary
  --dry-run            print the command instead of running it
  Any other argument is passed to python -m pipeline.run (e.g. --preset lite-gpu).
USAGE
}

project="${GCP_PROJECT:-}"; region="${GCP_REGION:-us-central1}"; bucket="${GCS_BUCKET:-}"
gpu_type="${GPU_TYPE:-nvidia-tesla-t4}"; gpu_count="${GPU_COUNT:-1}"
machine_type="${MACHINE_TYPE:-n1-standard-8}"; image="${WORKER_IMAGE:-}"; max_workers="${MAX_WORKERS:-50}"
dry_run=0; input=""; output=""; extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --region) region="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --gpu-type) gpu_type="$2"; shift 2 ;;
    --gpu-count) gpu_count="$2"; shift 2 ;;
    --machine-type) machine_type="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --max-workers) max_workers="$2"; shift 2 ;;
    --input) input="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --wait) extra+=("--wait"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done

missing=()
for name in project bucket image input output; do
  [ -n "${!name}" ] || missing+=("--${name}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]}" >&2; usage >&2; exit 2
fi

here="$(cd "$(dirname "$0")" && pwd)"
accelerator="type:${gpu_type};count:${gpu_count};install-nvidia-driver"
cmd=(python -m pipeline.run --input "$input" --output "$output"
     --runner DataflowRunner --project "$project" --region "$region"
     --temp_location "gs://${bucket}/tmp" --staging_location "gs://${bucket}/staging"
     --setup_file "${here}/setup.py" --sdk_container_image "$image"
     --machine_type "$machine_type" --max_num_workers "$max_workers"
     --dataflow_service_options "worker_accelerator=${accelerator}" --accelerator "$accelerator"
     --experiments use_runner_v2 --experiments no_use_multiple_sdk_containers
     --preset lite-gpu "${extra[@]}")

if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
cd "$here"
exec "${cmd[@]}"
