#!/usr/bin/env bash
# Schedule `faceaudit rebuild` with Cloud Scheduler -> a Dataflow flex template.
#   infra/dataflow/schedule_rebuild.sh PROJECT REGION BUCKET SERVICE_ACCOUNT [CRON]
# Builds and pushes the rebuild launcher and the worker image, writes the template spec
# (infra/dataflow/rebuild-template.json) to gs://BUCKET/templates/, and creates (or updates) a
# Cloud Scheduler job that launches it on CRON (default nightly 03:17 UTC) with the registry at
# gs://BUCKET/registry/, runs under gs://BUCKET/faceaudit and the index at gs://BUCKET/index.
# SERVICE_ACCOUNT needs roles/dataflow.developer, storage access to BUCKET, and
# iam.serviceAccountUser on the workers' account.
# The images are tagged with this commit (IMAGE_TAG overrides it), never a moving name, and the
# spec the job launches names them, so the nightly job runs what was scheduled, not whatever was
# pushed last. Re-running updates the job (gcloud scheduler jobs update http --update-headers).
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT=${1:?usage: schedule_rebuild.sh PROJECT REGION BUCKET SERVICE_ACCOUNT [CRON]}
REGION=${2:?region}
BUCKET=${3:?bucket}
ACCOUNT=${4:?service account e-mail}
CRON=${5:-17 3 * * *}
if [[ -z "${IMAGE_TAG:-}" ]]; then
  if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "uncommitted changes: commit them (the image tag is the commit) or set IMAGE_TAG" >&2
    exit 2
  fi
  IMAGE_TAG=$(git rev-parse HEAD)
fi
REPO="$REGION-docker.pkg.dev/$PROJECT/faceaudit"
LAUNCHER="$REPO/rebuild-launcher:$IMAGE_TAG"
WORKER="$REPO/worker-cpu:$IMAGE_TAG"
SPEC="gs://$BUCKET/templates/faceaudit-rebuild-$IMAGE_TAG.json"

docker build -f infra/dataflow/Dockerfile.rebuild-launcher -t "$LAUNCHER" .
docker build -f infra/dataflow/Dockerfile.worker -t "$WORKER" .
docker push "$LAUNCHER"
docker push "$WORKER"
sed -e "s|\${LAUNCHER_IMAGE}|$LAUNCHER|" -e "s|\${WORKER_IMAGE}|$WORKER|" \
  infra/dataflow/rebuild-template.json | gcloud storage cp - "$SPEC"

BODY=$(cat <<JSON
{"launchParameter": {
  "jobName": "faceaudit-rebuild",
  "containerSpecGcsPath": "$SPEC",
  "parameters": {"registry": "gs://$BUCKET/registry/", "work": "gs://$BUCKET/faceaudit",
                 "index": "gs://$BUCKET/index", "keep_versions": "3"},
  "environment": {"tempLocation": "gs://$BUCKET/tmp", "stagingLocation": "gs://$BUCKET/staging",
                  "serviceAccountEmail": "$ACCOUNT", "sdkContainerImage": "$WORKER"}}}
JSON
)
URI="https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch"
# `create http` takes --headers; `update http` has no --headers, only --update-headers.
if gcloud scheduler jobs describe faceaudit-rebuild --location "$REGION" --project "$PROJECT" >/dev/null 2>&1; then
  VERB=update
  HEADERS=--update-headers
else
  VERB=create
  HEADERS=--headers
fi
gcloud scheduler jobs "$VERB" http faceaudit-rebuild --project "$PROJECT" --location "$REGION" \
  --schedule "$CRON" --time-zone "Etc/UTC" --uri "$URI" --http-method POST \
  "$HEADERS" "Content-Type=application/json" --message-body "$BODY" \
  --oauth-service-account-email "$ACCOUNT"
