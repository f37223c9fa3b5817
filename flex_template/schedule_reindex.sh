#!/usr/bin/env bash
# Production schedule of the nightly re-index: build the worker and template images from this
# repository, register the Dataflow Flex Template (metadata.json), and create a Cloud Scheduler job
# that launches it every night. Prints the commands with --dry-run.
#
# The job itself is python -m pipeline.reindex: it takes the index's lock (a run that finds it held
# ends at once, changing nothing), publishes a new version only by compare-and-swap, and writes its
# report to INDEX/reports/<version>.json.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $0 --input gs://BUCKET/photos --index gs://BUCKET/index [options]

  --project ID          GCP project                         (env GCP_PROJECT)
  --region REGION       Dataflow / Scheduler region         (env GCP_REGION, default us-central1)
  --bucket NAME         bucket for the template, staging    (env GCS_BUCKET)
  --repository PATH     Artifact Registry images prefix,    (env IMAGE_REPOSITORY)
                        e.g. us-central1-docker.pkg.dev/PROJECT/delf
  --tag TAG             image tag                           (env IMAGE_TAG, default the git commit)
  --service-account SA  runs the job and calls the API      (env SERVICE_ACCOUNT)
  --schedule CRON       when, in --time-zone                (default "0 2 * * *")
  --time-zone TZ        (default Etc/UTC)
  --job-name NAME       Scheduler job name                  (default delf-nightly-reindex)
  --gpu-type TYPE       extraction GPU                      (env GPU_TYPE, default nvidia-tesla-t4)
  --max-workers N       autoscaling limit                   (env MAX_WORKERS, default 20)
  --skip-images         do not build/push the images (already pushed)
  --dry-run             print the commands instead of running them
USAGE
}

project="${GCP_PROJECT:-}"; region="${GCP_REGION:-us-central1}"; bucket="${GCS_BUCKET:-}"
repository="${IMAGE_REPOSITORY:-}"; tag="${IMAGE_TAG:-}"; service_account="${SERVICE_ACCOUNT:-}"
schedule="0 2 * * *"; time_zone="Etc/UTC"; job_name="delf-nightly-reindex"
gpu_type="${GPU_TYPE:-nvidia-tesla-t4}"; max_workers="${MAX_WORKERS:-20}"
input=""; index=""; dry_run=0; skip_images=0

while [ $# -gt 0 ]; do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --region) region="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --repository) repository="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --service-account) service_account="$2"; shift 2 ;;
    --schedule) schedule="$2"; shift 2 ;;
    --time-zone) time_zone="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --gpu-type) gpu_type="$2"; shift 2 ;;
    --max-workers) max_workers="$2"; shift 2 ;;
    --input) input="$2"; shift 2 ;;
    --index) index="$2"; shift 2 ;;
    --skip-images) skip_images=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

missing=()
for name in project bucket repository service_account input index; do
  [ -n "${!name}" ] || missing+=("--${name//_/-}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]}" >&2; usage >&2; exit 2
fi

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "${here}/.." && pwd)"
if [ -z "$tag" ]; then
  tag="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo latest)"
fi
worker_image="${repository}/delf-worker:${tag}"
template_image="${repository}/delf-reindex-template:${tag}"
template_spec="gs://${bucket}/templates/delf-reindex.json"
accelerator="type:${gpu_type};count:1;install-nvidia-driver"

run() {
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

if [ "$skip_images" -eq 0 ]; then
  run docker build -t "$worker_image" "$root"
  run docker push "$worker_image"
  run docker build -f "${here}/Dockerfile" --build-arg "WORKER_IMAGE=${worker_image}" -t "$template_image" "$root"
  run docker push "$template_image"
fi

run gcloud dataflow flex-template build "$template_spec" \
  --project "$project" --image "$template_image" --sdk-language PYTHON \
  --metadata-file "${here}/metadata.json"

# The Scheduler job POSTs a launch request to the Dataflow API, as the service account. Workers run
# the same image (sdkContainerImage); the extraction step gets the GPU via the accelerator hint.
body=$(cat <<JSON
{"launchParameter": {"jobName": "${job_name}", "containerSpecGcsPath": "${template_spec}",
 "parameters": {"input": "${input}", "index": "${index}", "accelerator": "${accelerator}", "preset": "lite-gpu"},
 "environment": {"serviceAccountEmail": "${service_account}", "maxWorkers": ${max_workers},
  "tempLocation": "gs://${bucket}/tmp", "stagingLocation": "gs://${bucket}/staging",
  "sdkContainerImage": "${worker_image}",
  "additionalExperiments": ["use_runner_v2", "no_use_multiple_sdk_containers",
                            "worker_accelerator=${accelerator}"],
  "additionalUserLabels": {"app": "delf-reindex"}}}}
JSON
)

run gcloud scheduler jobs create http "$job_name" \
  --project "$project" --location "$region" \
  --schedule "$schedule" --time-zone "$time_zone" \
  --uri "https://dataflow.googleapis.com/v1b3/projects/${project}/locations/${region}/flexTemplates:launch" \
  --http-method POST --headers "Content-Type=application/json" \
  --oauth-service-account-email "$service_account" \
  --oauth-token-scope "https://www.googleapis.com/auth/cloud-platform" \
  --message-body "$body"
