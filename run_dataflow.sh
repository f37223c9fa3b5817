#!/usr/bin/env bash
# Launch the DELF index build (python -m pipeline.run) on Google Cloud Dataflow with GPU workers.
#
# Workers run the container built from ./Dockerfile (CUDA TensorFlow + the pinned Beam SDK); the
# project reaches them as an sdist of ./setup.py. The Dataflow options come from pipeline/dataflow.py,
# the one list this script, the nightly Flex Template and the offline translation tests share: the
# GPU reaches the extraction workers as a Beam accelerator hint (Dataflow's right fitting).
# Prints the job's console URL; --dry-run prints the command instead of running it.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"

usage() {
  cat <<USAGE
Usage: $0 --input SRC --output gs://BUCKET/index --project ID --bucket NAME --image URI [options]

  --project ID         GCP project            (env GCP_PROJECT)
  --bucket NAME        staging/temp bucket    (env GCS_BUCKET)
  --image URI          worker container image (env WORKER_IMAGE)
  --region, --gpu-type, --gpu-count, --machine-type, --max-workers: the Dataflow settings below
  --wait               wait for the job and print the index summary
  --dry-run            print the command instead of running it
  Any other argument is passed to python -m pipeline.run (e.g. --preset lite).

USAGE
  (cd "$here" && python -m pipeline.dataflow options --help) | sed -n '/^Dataflow settings:/,$p'
}

project="${GCP_PROJECT:-}"; bucket="${GCS_BUCKET:-}"; image="${WORKER_IMAGE:-}"
dry_run=0; input=""; output=""; settings=(); extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --region|--gpu-type|--gpu-count|--machine-type|--max-workers) settings+=("$1" "$2"); shift 2 ;;
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

# The Beam options and the job's own (--accelerator, --preset), one a line.
listed="$(cd "$here" && python -m pipeline.dataflow options --project "$project" --bucket "$bucket" \
          --image "$image" "${settings[@]}")"
mapfile -t options <<< "$listed"
cmd=(python -m pipeline.run --input "$input" --output "$output" "${options[@]}" "${extra[@]}")

if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
cd "$here"
exec "${cmd[@]}"
