#!/usr/bin/env bash
# Run an ingest on the Ray cluster of infra/ray/gcp-gpu.yaml (started if it is not up).
#   infra/ray/run_ingest.sh [JOB_YAML under infra/jobs/] [extra faceaudit ingest flags...]
# Re-run with --run-id ID to resume a run that was interrupted.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=infra/ray/gcp-gpu.yaml
JOB=${1:-infra/jobs/ingest-gpu.yaml}
shift || true
ray up -y "$CLUSTER"
# file_mounts put infra/jobs/ at /tmp/faceaudit/jobs/ on every node.
ray exec "$CLUSTER" \
  "faceaudit ingest --config /tmp/faceaudit/jobs/$(basename "$JOB") --engine ray --ray-address auto --no-progress $*"
