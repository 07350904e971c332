#!/usr/bin/env bash
# Run an ingest on the Ray cluster of infra/ray/gcp-gpu.yaml (started if it is not up).
#   infra/ray/run_ingest.sh [JOB_YAML under infra/jobs/] [extra faceaudit ingest flags...]
# Re-run with --run-id ID to resume a run that was interrupted.
# The nodes run the GPU image tagged with this commit (IMAGE_TAG overrides it): build and push it
# first (docs/engines.md). A tree with uncommitted changes has no commit to name, so it is refused.
set -euo pipefail
cd "$(dirname "$0")/../.."
JOB=${1:-infra/jobs/ingest-gpu.yaml}
shift || true
if [[ -z "${IMAGE_TAG:-}" ]]; then
  if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "uncommitted changes: commit them (the image tag is the commit) or set IMAGE_TAG" >&2
    exit 2
  fi
  IMAGE_TAG=$(git rev-parse HEAD)
fi
CLUSTER=/tmp/faceaudit-ray-$IMAGE_TAG.yaml
sed "s|:GIT_SHA\$|:$IMAGE_TAG|" infra/ray/gcp-gpu.yaml > "$CLUSTER"
ray up -y "$CLUSTER"
# file_mounts put infra/jobs/ at /tmp/faceaudit/jobs/ on every node.
ray exec "$CLUSTER" \
  "faceaudit ingest --config /tmp/faceaudit/jobs/$(basename "$JOB") --engine ray --ray-address auto --no-progress $*"
