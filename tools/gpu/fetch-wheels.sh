#!/usr/bin/env bash
# Puts the Python packages device-check.sh needs and GPU machines lack into .whl/ (ignored by
# git): diffusers 0.42.1 (the version the fixtures were made with) without its pipeline
# folders (bench_diffusers.py builds models directly; 6.4 MB -> 2.3 MB of the 64 MiB that
# travels) and importlib_metadata.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp" diffusers==0.42.1 importlib_metadata
mv "$tmp"/importlib_metadata-*.whl .whl/
(cd "$tmp" && unzip -q diffusers-*.whl && rm diffusers-*.whl \
  && rm -rf diffusers/pipelines/[a-z]*/ diffusers/modular_pipelines/[a-z]*/ \
  && zip -q -9 -r "$OLDPWD/.whl/diffusers-0.42.1-py3-none-any.whl" diffusers diffusers-0.42.1.dist-info)
rm -rf "$tmp"
ls -l .whl
