#!/usr/bin/env bash
# Production schedule of the nightly re-index: build the worker and template images from this
# repository, register the Dataflow Flex Template (metadata.json), and create a Cloud Scheduler job
# that launches it every night. Prints the commands with --dry-run.
#
# The job itself is python -m pipeline.reindex: it takes the index's lock (a run that finds it held
# ends at once, changing nothing), publishes a new version only by compare-and-swap, and writes its
# report to INDEX/reports/<version>.json. Its Dataflow options (the launch request's parameters and
# runtime environment) come from pipeline/dataflow.py, as run_dataflow.sh's do.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "${here}/.." && pwd)"

usage() {
  cat <<USAGE
Usage: $0 --input gs://BUCKET/photos --index gs://BUCKET/index [options]

  --project ID          GCP project                         (env GCP_PROJECT)
  --region REGION       Dataflow / Scheduler region         (env GCP_REGION, default below)
  --bucket NAME         bucket for the template, staging    (env GCS_BUCKET)
  --repository PATH     Artifact Registry images prefix,    (env IMAGE_REPOSITORY)
                        e.g. us-central1-docker.pkg.dev/PROJECT/delf
  --tag TAG             image tag                           (env IMAGE_TAG, default the git commit)
  --service-account SA  runs the job and calls the API      (env SERVICE_ACCOUNT)
  --schedule CRON       when, in --time-zone                (default "0 2 * * *")
  --time-zone TZ        (default Etc/UTC)
  --job-name NAME       Scheduler job name                  (default delf-nightly-reindex)
  --gpu-type, --gpu-count, --machine-type, --max-workers: the Dataflow settings below
  --skip-images         do not build/push the images (already pushed)
  --dry-run             print the commands instead of running them

USAGE
  (cd "$root" && python -m pipeline.dataflow flex-launch --help) | sed -n '/^Dataflow settings:/,$p' \
    | grep -v -e '--project' -e '--bucket' -e '--image'
}

project="${GCP_PROJECT:-}"; bucket="${GCS_BUCKET:-}"
repository="${IMAGE_REPOSITORY:-}"; tag="${IMAGE_TAG:-}"; service_account="${SERVICE_ACCOUNT:-}"
schedule="0 2 * * *"; time_zone="Etc/UTC"; job_name="delf-nightly-reindex"
input=""; index=""; dry_run=0; skip_images=0; settings=()

while [ $# -gt 0 ]; do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --repository) repository="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --service-account) service_account="$2"; shift 2 ;;
    --schedule) schedule="$2"; shift 2 ;;
    --time-zone) time_zone="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --region|--gpu-type|--gpu-count|--machine-type|--max-workers) settings+=("$1" "$2"); shift 2 ;;
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

if [ -z "$tag" ]; then
  tag="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo latest)"
fi
worker_image="${repository}/delf-worker:${tag}"
template_image="${repository}/delf-reindex-template:${tag}"
template_spec="gs://${bucket}/templates/delf-reindex.json"
# The Scheduler job's launch request, from pipeline/dataflow.py: the region, the launch URL and the
# request's body, one a line (first, so that bad settings stop the script before anything is built).
launch="$(cd "$root" && python -m pipeline.dataflow flex-launch --project "$project" --bucket "$bucket" \
          --image "$worker_image" "${settings[@]}" --input "$input" --index "$index" \
          --job-name "$job_name" --template-spec "$template_spec" --service-account "$service_account")"
{ read -r region; read -r uri; read -r body; } <<< "$launch"

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

# The Scheduler job POSTs the launch request to the Dataflow API, as the service account. Workers run
# the same image (sdkContainerImage); the extraction stage gets the GPU via the accelerator hint.

run gcloud scheduler jobs create http "$job_name" \
  --project "$project" --location "$region" \
  --schedule "$schedule" --time-zone "$time_zone" \
  --uri "$uri" \
  --http-method POST --headers "Content-Type=application/json" \
  --oauth-service-account-email "$service_account" \
  --oauth-token-scope "https://www.googleapis.com/auth/cloud-platform" \
  --message-body "$body"
