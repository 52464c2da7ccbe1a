#!/usr/bin/env bash
# Makes what a Docker build needs on a host with no container registry and no package index
# reachable from builds: a Debian base image with python3 (from Debian's packages, cached) and
# the Python wheels envfarm depends on (in docker/wheels/). Idempotent; prints the base image name.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=envfarm-base:bookworm
CACHE=${ENVFARM_CACHE:-/var/cache/envfarm}
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    mkdir -p "$CACHE"
    if [ ! -s "$CACHE/bookworm-base.tar" ]; then
        command -v debootstrap >/dev/null || { echo "debootstrap is needed (apt-get install debootstrap)" >&2; exit 3; }
        rm -rf "$CACHE/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$CACHE/rootfs" "$(docker/debian-mirror.sh)" >&2
        tar -C "$CACHE/rootfs" -cf "$CACHE/bookworm-base.tar" .
        rm -rf "$CACHE/rootfs"
    fi
    docker import "$CACHE/bookworm-base.tar" "$BASE" >&2
fi
# The wheels of envfarm's dependencies as pyproject.toml lists them now (pip keeps those already here).
mapfile -t dependencies < <(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
python3 -m pip download -q -d docker/wheels --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    setuptools wheel "${dependencies[@]}" >&2
echo "$BASE"
