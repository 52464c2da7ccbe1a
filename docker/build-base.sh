#!/usr/bin/env bash
# Makes what a Docker build needs on a host with no container registry and no package index
# reachable from builds: a Debian base image with python3 (from Debian's packages, cached) and
# the Python wheels envfarm depends on (in docker/wheels/). Idempotent; prints the base image name.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tag and the cached tarball name the recipe: a change to it below makes a new base. A
# tarball older than a week is made again, so the base takes Debian's point-release fixes.
RECIPE=2
BASE=envfarm-base:bookworm-$RECIPE
TARBALL=bookworm-base-$RECIPE.tar
CACHE=${ENVFARM_CACHE:-/var/cache/envfarm}
mkdir -p "$CACHE"
if [ -n "$(find "$CACHE" -maxdepth 1 -name "$TARBALL" -mtime +7 2>/dev/null)" ]; then
    rm -f "$CACHE/$TARBALL"
    docker rmi -f "$BASE" >/dev/null 2>&1 || true
fi
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    if [ ! -s "$CACHE/$TARBALL" ]; then
        command -v debootstrap >/dev/null || { echo "debootstrap is needed (apt-get install debootstrap)" >&2; exit 3; }
        rm -rf "$CACHE/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$CACHE/rootfs" "$(docker/debian-mirror.sh)" >&2
        # What an image never needs: apt's package lists and downloaded packages, documentation,
        # manuals and translations (about 140 MB of the 265).
        rm -rf "$CACHE/rootfs"/var/lib/apt/lists/* "$CACHE/rootfs"/var/cache/apt/* "$CACHE/rootfs"/usr/share/doc \
               "$CACHE/rootfs"/usr/share/man "$CACHE/rootfs"/usr/share/info
        find "$CACHE/rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
        tar -C "$CACHE/rootfs" -cf "$CACHE/$TARBALL" .
        rm -rf "$CACHE/rootfs"
    fi
    docker import "$CACHE/$TARBALL" "$BASE" >&2
fi
# The wheels of envfarm's dependencies as pyproject.toml lists them now (pip keeps those already here).
mapfile -t dependencies < <(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
python3 -m pip download -q -d docker/wheels --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    setuptools wheel "${dependencies[@]}" >&2
echo "$BASE"
