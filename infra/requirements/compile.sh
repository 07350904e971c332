#!/usr/bin/env bash
# Regenerate the pinned, hashed requirement files the images install from (run after changing
# pyproject.toml's dependencies): bash infra/requirements/compile.sh
# constraints.txt holds every image to one Beam. gpu.txt leaves out faiss-cpu and onnxruntime:
# they install the same modules as faiss-gpu-cu12 and onnxruntime-gpu and would shadow them.
set -euo pipefail
cd "$(dirname "$0")/../.."
compile() {  # output, then uv pip compile arguments
  local out=$1
  shift
  uv pip compile pyproject.toml "$@" --constraint infra/requirements/constraints.txt \
    --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --no-header -o "infra/requirements/$out"
}
compile cpu.txt --extra ray --extra beam --extra gcs
compile gpu.txt infra/requirements/dataflow.in --extra gpu --extra ray --extra beam --extra gcs \
  --no-emit-package faiss-cpu --no-emit-package onnxruntime
compile dataflow.txt infra/requirements/dataflow.in --extra beam --extra gcs
compile serve.txt --extra serve --extra gcs  # the look-up service (infra/docker/Dockerfile.serve)
