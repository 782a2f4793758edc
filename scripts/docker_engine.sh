#!/usr/bin/env bash
# A Docker engine for tests/test_docker.py on a Debian machine where this runs as root (.ci/run calls it):
#   - Debian's docker.io (the engine, 20.10) and debootstrap (stand-in base images, scripts/standin_bases.sh);
#   - Compose v2, from Debian trixie's docker-compose package: bookworm's is the old Python 1.29, which reads
#     neither `!reset` (docker-compose.cpu.yml) nor `up --wait`. The package is a static Go binary needing only
#     libc; it is checked against the archive's signed index (gpgv with Debian's archive keyring), and only the
#     plugin is taken from it;
#   - dockerd, started in the background when none answers.
# Where it cannot (not root, no apt), it says why and exits 0: the docker tests then skip and print their reason.
set -euo pipefail

COMPOSE_SUITE=trixie
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
  echo "docker_engine.sh: needs root and apt-get (Debian); the docker tests will be skipped"
  exit 0
fi
started=$(date +%s)

if ! command -v dockerd > /dev/null || ! command -v debootstrap > /dev/null || ! command -v curl > /dev/null; then
  apt-get update -q > /dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap curl xz-utils > /dev/null
fi

if ! docker compose version 2> /dev/null | grep -q "version v\?2"; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  arch=$(dpkg --print-architecture)
  curl -fsS -o "$work/InRelease" "$MIRROR/dists/$COMPOSE_SUITE/InRelease"
  # only what the signature covers is read further
  gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg --output "$work/Release" "$work/InRelease" 2> /dev/null
  index=main/binary-$arch/Packages.xz
  want=$(awk -v f="$index" '/^SHA256:/ {s = 1; next} /^[A-Za-z]/ {s = 0} s && $3 == f {print $1}' "$work/Release")
  curl -fsS -o "$work/Packages.xz" "$MIRROR/dists/$COMPOSE_SUITE/$index"
  echo "$want  $work/Packages.xz" | sha256sum -c --quiet
  xz -d "$work/Packages.xz"
  stanza=$(awk '/^Package: docker-compose$/ {p = 1} p && /^$/ {exit} p' "$work/Packages")
  file=$(sed -n 's/^Filename: //p' <<< "$stanza")
  sum=$(sed -n 's/^SHA256: //p' <<< "$stanza")
  curl -fsS -o "$work/compose.deb" "$MIRROR/$file"
  echo "$sum  $work/compose.deb" | sha256sum -c --quiet
  # a static binary: only the plugin goes in (Docker's CLIs look for it there), no package to depend on
  dpkg-deb -x "$work/compose.deb" "$work/root"
  install -D -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-compose" \
    /usr/libexec/docker/cli-plugins/docker-compose
fi

if ! docker info > /dev/null 2>&1; then
  (dockerd > /var/log/dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 0.5; done
fi
docker info > /dev/null || { tail -20 /var/log/dockerd.log; exit 1; }
echo "docker_engine.sh: engine $(docker version -f '{{.Server.Version}}'), $(docker compose version)," \
     "ready in $(( $(date +%s) - started )) s"
