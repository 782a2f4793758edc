#!/usr/bin/env bash
# Stand-in base images for tests/test_docker.py where no image registry is reachable: a Debian bookworm root file
# system (debootstrap, from Debian's package archive) with Debian's Python (python3, python3-venv) and Redis
# (redis-server, redis-cli), imported as one image and given two tags:
#   baton-standin/python:bookworm   in place of python:3.11-slim-bookworm (the CPU image's BASE)
#   baton-standin/redis:bookworm    in place of redis:7.4-alpine (the compose file's BATON_REDIS_IMAGE)
# Needs root and debootstrap (scripts/docker_engine.sh installs it). Existing tags are kept; --force rebuilds.
set -euo pipefail

PYTHON_TAG=baton-standin/python:bookworm
REDIS_TAG=baton-standin/redis:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "${1:-}" != --force ] && docker image inspect "$PYTHON_TAG" "$REDIS_TAG" > /dev/null 2>&1; then
  exit 0
fi
started=$(date +%s)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,redis-server bookworm "$root" "$MIRROR" > /dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$PYTHON_TAG" > /dev/null
docker tag "$PYTHON_TAG" "$REDIS_TAG"
echo "standin_bases.sh: $PYTHON_TAG and $REDIS_TAG made in $(( $(date +%s) - started )) s"
