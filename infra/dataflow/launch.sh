#!/usr/bin/env bash
# Build the Dataflow images and the flex template spec, then launch an ingest on Dataflow.
#   infra/dataflow/launch.sh PROJECT REGION BUCKET [JOB_YAML] [--gpu]
# JOB_YAML is a job file inside the image (default infra/jobs/ingest-cpu.yaml). --gpu builds the
# CUDA worker (infra/docker/Dockerfile.gpu, then infra/dataflow/Dockerfile.worker-gpu) and asks
# Dataflow for one T4 per n1-standard-8 worker with one SDK process (one model per GPU).
# Every image is tagged with this commit (IMAGE_TAG overrides it), never a moving name: CPU and GPU
# workers live in repositories of their own (worker-cpu, worker-gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT=${1:?usage: launch.sh PROJECT REGION BUCKET [JOB_YAML] [--gpu]}
REGION=${2:?region}
BUCKET=${3:?bucket}
JOB=${4:-infra/jobs/ingest-cpu.yaml}
GPU=${5:-}
if [[ -z "${IMAGE_TAG:-}" ]]; then
  if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "uncommitted changes: commit them (the image tag is the commit) or set IMAGE_TAG" >&2
    exit 2
  fi
  IMAGE_TAG=$(git rev-parse HEAD)
fi
REPO="$REGION-docker.pkg.dev/$PROJECT/faceaudit"
LAUNCHER="$REPO/launcher:$IMAGE_TAG"
SPEC="gs://$BUCKET/templates/faceaudit-ingest-$IMAGE_TAG.json"

docker build -f infra/dataflow/Dockerfile.launcher -t "$LAUNCHER" .
EXTRA=()
if [[ "$GPU" == "--gpu" ]]; then
  BASE="$REPO/gpu:$IMAGE_TAG"
  WORKER="$REPO/worker-gpu:$IMAGE_TAG"
  docker build -f infra/docker/Dockerfile.gpu -t "$BASE" .
  docker build -f infra/dataflow/Dockerfile.worker-gpu --build-arg "GPU_IMAGE=$BASE" -t "$WORKER" .
  docker push "$BASE"
  # One SDK process per worker (no_use_multiple_sdk_containers), so one model on its one T4; the
  # accelerator is a Dataflow service option (Google's documented form, no longer an experiment).
  EXTRA=(--worker-machine-type n1-standard-8
         --additional-experiments no_use_multiple_sdk_containers
         --additional-pipeline-options "dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver")
else
  WORKER="$REPO/worker-cpu:$IMAGE_TAG"
  docker build -f infra/dataflow/Dockerfile.worker -t "$WORKER" .
fi
docker push "$LAUNCHER"
docker push "$WORKER"

# The spec: infra/dataflow/flex-template.json with the launcher and worker images filled in.
sed -e "s|\${LAUNCHER_IMAGE}|$LAUNCHER|" -e "s|\${WORKER_IMAGE}|$WORKER|" \
  infra/dataflow/flex-template.json | gcloud storage cp - "$SPEC"

gcloud dataflow flex-template run "faceaudit-ingest-$(date -u +%Y%m%d-%H%M%S)" \
  --project "$PROJECT" --region "$REGION" \
  --template-file-gcs-location "$SPEC" \
  --temp-location "gs://$BUCKET/tmp" --staging-location "gs://$BUCKET/staging" \
  --parameters "config=$JOB" \
  --parameters "out=gs://$BUCKET/faceaudit" \
  "${EXTRA[@]}"
