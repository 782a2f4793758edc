#!/usr/bin/env bash
# Build Baton's image with no registry and no network inside the build (`make image`; deploy/README.md):
#   1. download every wheel the image needs, for the image's Python and platform, into deploy/docker/wheels;
#   2. docker build, which installs from that wheelhouse alone (deploy/docker/pip-install).
# Settings (environment): VARIANT cpu|cuda (cpu), TAG (baton:$VARIANT), BASE (python:3.11-slim-bookworm for cpu,
# or, where no registry answers, a Debian bookworm base made here; the PyTorch CUDA image for cuda; any image with
# python3 and its venv module), PYTHON_VERSION (the base's: 3.11),
# TORCH_VERSION (cpu: the torch to put in the image, 2.13.0), TORCH_INDEX (cpu: where the CPU build of torch is,
# https://download.pytorch.org/whl/cpu, used when it answers), PYTHON (a python with pip, to download: python3),
# WHEELS=0 to skip the wheelhouse (pip then installs from the indexes inside the build, which needs network
# there). Extra arguments go to `docker build`.
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT=${VARIANT:-cpu}
BASE_GIVEN=${BASE:-}
case "$VARIANT" in
  cpu)  BASE=${BASE:-python:3.11-slim-bookworm} ;;
  cuda) BASE=${BASE:-pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime} ;;
  *) echo "image.sh: VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2 ;;
esac
TAG=${TAG:-baton:$VARIANT}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
WHEELS=${WHEELS:-1}
PYTHON=${PYTHON:-python3}
WHEELHOUSE=deploy/docker/wheels

# The base must be here or pullable. Where no registry answers, the CPU image is built on a Debian bookworm base
# made locally (scripts/standin_bases.sh: Debian's Python 3.11), unless BASE was given.
if ! docker image inspect "$BASE" > /dev/null 2>&1 && ! docker pull -q "$BASE" > /dev/null 2>&1; then
  if [ "$VARIANT" = cpu ] && [ -z "$BASE_GIVEN" ]; then
    echo "image.sh: $BASE cannot be pulled; building on a Debian bookworm base made here (scripts/standin_bases.sh)"
    scripts/standin_bases.sh
    BASE=baton-standin/python:bookworm
  else
    echo "image.sh: the base image $BASE is not here and cannot be pulled" >&2
    exit 2
  fi
fi

rm -f "$WHEELHOUSE"/*.whl
if [ "$WHEELS" = 1 ]; then
  started=$(date +%s)
  reqs=$(mktemp)
  trap 'rm -f "$reqs"' EXIT
  # Baton's dependencies and its build backend (pip's isolated build takes it from the wheelhouse too).
  "$PYTHON" deploy/docker/requirements.py --build pyproject.toml > "$reqs"
  torch_source=()
  if [ "$VARIANT" = cpu ]; then
    # the CPU build of torch: from TORCH_INDEX when it answers, else from pip's own configuration
    echo "torch==$TORCH_VERSION" >> "$reqs"
    if [ -n "$TORCH_INDEX" ] && curl -fsS -m 10 -o /dev/null "$TORCH_INDEX/torch/" 2> /dev/null; then
      torch_source=(--extra-index-url "$TORCH_INDEX")
    else
      echo "image.sh: ${TORCH_INDEX:-no TORCH_INDEX} does not answer; torch comes from pip's own configuration"
    fi
  else
    sed -i '/^torch\b/d' "$reqs"  # the CUDA base has its torch, which the image's virtualenv sees
  fi
  # Wheels for glibc up to Debian bookworm's 2.36, every manylinux tag spelled out (older pips do not expand them).
  platform=(--python-version "$PYTHON_VERSION" --implementation cp --only-binary=:all:
            --platform "manylinux2014_$(uname -m)")
  for minor in $(seq 17 36); do platform+=(--platform "manylinux_2_${minor}_$(uname -m)"); done
  "$PYTHON" -m pip download -q -d "$WHEELHOUSE" "${platform[@]}" "${torch_source[@]}" -r "$reqs"
  "$PYTHON" -m pip download -q -d "$WHEELHOUSE" "${platform[@]}" --no-deps \
    "$("$PYTHON" deploy/docker/requirements.py --model)"
  # pip evaluates dependencies' environment markers for the Python that runs it, not for --python-version (redis
  # needs async-timeout below Python 3.11.3, say), so the image's own Python checks the wheelhouse, without
  # network; what it still lacks it downloads itself (host network, the host's CA bundle for pip), next to what
  # is there.
  in_base=(docker run --rm --user "$(id -u):$(id -g)" -e HOME=/tmp -v "$PWD/$WHEELHOUSE:/wheels"
           -v "$reqs:/tmp/requirements.txt:ro")
  venv='python3 -m venv --system-site-packages /tmp/venv && /tmp/venv/bin/pip -q --disable-pip-version-check'
  if ! "${in_base[@]}" --network none "$BASE" sh -c "$venv install --dry-run --no-index --find-links /wheels \
         -r /tmp/requirements.txt" > /dev/null; then
    cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$cert" ] && in_base+=(-v "$cert:/tmp/ca.crt:ro" -e PIP_CERT=/tmp/ca.crt)
    echo "completing the wheelhouse with $BASE's Python"
    "${in_base[@]}" --network host "$BASE" sh -c "$venv download -d /wheels --find-links /wheels \
       --only-binary=:all: -r /tmp/requirements.txt"
  fi
  echo "wheelhouse: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)," \
       "downloaded in $(( $(date +%s) - started )) s"
fi

started=$(date +%s)
docker build -f deploy/docker/Dockerfile -t "$TAG" --build-arg BASE="$BASE" \
  --build-arg TORCH_VERSION="$TORCH_VERSION" "$@" .
echo "built $TAG from $BASE in $(( $(date +%s) - started )) s:" \
     "$(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.2f GB", $1 / 1e9}')"
