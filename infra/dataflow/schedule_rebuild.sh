#!/usr/bin/env bash
# Schedule `faceaudit rebuild` with Cloud Scheduler -> a Dataflow flex template.
#   infra/dataflow/schedule_rebuild.sh PROJECT REGION BUCKET SERVICE_ACCOUNT [CRON]
# Builds and pushes the rebuild launcher and the worker image, writes the template spec
# (infra/dataflow/rebuild-template.json) to gs://BUCKET/templates/, and creates (or updates) a
# Cloud Scheduler job that launches it on CRON (default nightly 03:17 UTC) with the registry at
# gs://BUCKET/registry/, runs under gs://BUCKET/faceaudit and the index at gs://BUCKET/index.
# SERVICE_ACCOUNT needs roles/dataflow.developer, storage access to BUCKET, and
# iam.serviceAccountUser on the workers' account.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT=${1:?usage: schedule_rebuild.sh PROJECT REGION BUCKET SERVICE_ACCOUNT [CRON]}
REGION=${2:?region}
BUCKET=${3:?bucket}
ACCOUNT=${4:?service account e-mail}
CRON=${5:-17 3 * * *}
REPO="$REGION-docker.pkg.dev/$PROJECT/faceaudit"
LAUNCHER="$REPO/rebuild-launcher:latest"
WORKER="$REPO/worker:latest"
SPEC="gs://$BUCKET/templates/faceaudit-rebuild.json"

docker build -f infra/dataflow/Dockerfile.rebuild-launcher -t "$LAUNCHER" .
docker build -f infra/dataflow/Dockerfile.worker -t "$WORKER" .
docker push "$LAUNCHER"
docker push "$WORKER"
sed "s|\${LAUNCHER_IMAGE}|$LAUNCHER|" infra/dataflow/rebuild-template.json | gcloud storage cp - "$SPEC"

BODY=$(cat <<JSON
{"launchParameter": {
  "jobName": "faceaudit-rebuild",
  "containerSpecGcsPath": "$SPEC",
  "parameters": {"registry": "gs://$BUCKET/registry/", "work": "gs://$BUCKET/faceaudit",
                 "index": "gs://$BUCKET/index", "keep_versions": "3",
                 "sdk_container_image": "$WORKER"},
  "environment": {"tempLocation": "gs://$BUCKET/tmp", "stagingLocation": "gs://$BUCKET/staging",
                  "serviceAccountEmail": "$ACCOUNT"}}}
JSON
)
URI="https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch"
if gcloud scheduler jobs describe faceaudit-rebuild --location "$REGION" --project "$PROJECT" >/dev/null 2>&1; then
  VERB=update
else
  VERB=create
fi
gcloud scheduler jobs "$VERB" http faceaudit-rebuild --project "$PROJECT" --location "$REGION" \
  --schedule "$CRON" --time-zone "Etc/UTC" --uri "$URI" --http-method POST \
  --headers "Content-Type=application/json" --message-body "$BODY" \
  --oauth-service-account-email "$ACCOUNT"
