#!/bin/sh
# The server-only install of stylecast (torch-free): the container images run it, and tests/deploy runs it.
#
#   deploy/install.sh [--venv DIR] [--gpu] [--faces] [--python PYTHON] [SOURCE]
#
# SOURCE (default: the checkout this script lives in) is a source tree, an sdist or a wheel. The result is a venv
# whose `stylecast serve`, `stylecast client ...` and `stylecast export verify` run on ONNX Runtime (CPU), or with
# --gpu on onnxruntime-gpu + TensorRT + cuda-python. --faces adds dlib and its model files (Stylize on face models).
# pip options (an index, a cache) come from the usual PIP_* environment variables.
set -eu

venv=/opt/stylecast
python=python3
gpu=0
extras=""
source_dir=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --gpu) gpu=1; extras="${extras:+$extras,}gpu"; shift ;;
        --faces) extras="${extras:+$extras,}faces"; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
        *) source_dir=$1; shift ;;
    esac
done

"$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
$pip install "$source_dir${extras:+[$extras]}"

if [ "$gpu" = 1 ]; then
    # onnxruntime (a base dependency) and onnxruntime-gpu install the same `onnxruntime` package: drop the CPU
    # wheel, then reinstall the GPU wheel over the files the removal took with it.
    ort_gpu=$($venv/bin/python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')
    $pip uninstall --yes onnxruntime
    $pip install --no-deps --force-reinstall "onnxruntime-gpu==$ort_gpu"
fi

# Smoke check: the console script runs, and the server-only install holds no torch.
"$venv/bin/stylecast" --version
if "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    echo "install.sh: torch is installed in $venv, which should be server-only" >&2
    exit 1
fi
