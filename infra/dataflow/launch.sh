#!/usr/bin/env bash
# Build the Dataflow images and the flex template spec, then launch an ingest on Dataflow.
#   infra/dataflow/launch.sh PROJECT REGION BUCKET [JOB_YAML] [--gpu]
# JOB_YAML is a job file inside the image (default infra/jobs/ingest-cpu.yaml). --gpu builds the
# CUDA worker from infra/docker/Dockerfile.gpu and asks Dataflow for one T4 per worker.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT=${1:?usage: launch.sh PROJECT REGION BUCKET [JOB_YAML] [--gpu]}
REGION=${2:?region}
BUCKET=${3:?bucket}
JOB=${4:-infra/jobs/ingest-cpu.yaml}
GPU=${5:-}
REPO="$REGION-docker.pkg.dev/$PROJECT/faceaudit"
LAUNCHER="$REPO/launcher:latest"
WORKER="$REPO/worker:latest"
SPEC="gs://$BUCKET/templates/faceaudit-ingest.json"

docker build -f infra/dataflow/Dockerfile.launcher -t "$LAUNCHER" .
EXTRA=()
if [[ "$GPU" == "--gpu" ]]; then
  docker build -f infra/docker/Dockerfile.gpu -t faceaudit:gpu .
  docker build -f infra/dataflow/Dockerfile.worker --build-arg BASE=faceaudit:gpu -t "$WORKER" .
  EXTRA=(--additional-experiments "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
         --worker-machine-type n1-standard-8)
else
  docker build -f infra/dataflow/Dockerfile.worker -t "$WORKER" .
fi
docker push "$LAUNCHER"
docker push "$WORKER"

# The spec: infra/dataflow/flex-template.json with the launcher image filled in.
sed "s|\${LAUNCHER_IMAGE}|$LAUNCHER|" infra/dataflow/flex-template.json | gcloud storage cp - "$SPEC"

gcloud dataflow flex-template run "faceaudit-ingest-$(date -u +%Y%m%d-%H%M%S)" \
  --project "$PROJECT" --region "$REGION" \
  --template-file-gcs-location "$SPEC" \
  --temp-location "gs://$BUCKET/tmp" --staging-location "gs://$BUCKET/staging" \
  --parameters "config=$JOB" \
  --parameters "out=gs://$BUCKET/faceaudit" \
  --parameters "sdk_container_image=$WORKER" \
  "${EXTRA[@]}"
