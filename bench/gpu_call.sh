#!/usr/bin/env bash
# bench/gpu.py in one call on a lent GPU machine (docs/dlib-onnx.md, "On a lent GPU").
#
# Here, once (fills two ignored folders, about 26 MB together):
#   bash bench/gpu_call.sh prepare
# There, as the device call's command, carrying [".bench/dlib-dat", ".bench/wheels"]:
#   bash bench/gpu_call.sh
# Extra arguments go to bench/gpu.py (e.g. --budget 300); PYTHON picks the interpreter (python3).
# The report lands in $OUT (gpu.json, gpu.log), or .bench/gpu-out without $OUT.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python3}
dat=.bench/dlib-dat
wheels=.bench/wheels

if [ "${1:-}" = prepare ]; then
    venv=${VENV:-.venv}
    models=$("$venv/bin/python" -c 'import face_recognition_models as m; print(m.__path__[0])')/models
    mkdir -p "$dat" "$wheels" || exit 1
    cp "$models/dlib_face_recognition_resnet_model_v1.dat" "$models/mmod_human_face_detector.dat" "$dat/" || exit 1
    # pydantic (pipelines/core/config.py) is the one module the machine lacks; the same versions
    # as our venv, for its Python 3.12 on x86-64; typing-extensions too, since pydantic needs a
    # newer one than the machine may have
    pins=$("$venv/bin/python" -m pip freeze |
        grep -iE '^(pydantic|pydantic.core|annotated.types|typing.inspection|typing.extensions)==')
    # shellcheck disable=SC2086 # one pin per word
    "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$wheels" $pins || exit 1
    du -sh "$dat" "$wheels"
    exit 0
fi

out=${OUT:-.bench/gpu-out}
mkdir -p "$out" || exit 1
if ! "$python" -c 'import pydantic' 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/nvidia-smi.txt"
# the bench's --budget (420 s) stops starting measurements in time; timeout is the backstop
PYTHONUNBUFFERED=1 timeout 560 "$python" bench/gpu.py --dlib-dat "$dat" --out "$out/gpu.json" "$@" 2>&1 |
    tee "$out/gpu.log"
