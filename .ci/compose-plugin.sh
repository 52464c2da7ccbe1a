#!/usr/bin/env bash
# Puts the `docker compose` plugin (v2) into ~/.docker/cli-plugins when the engine's CLI lacks it,
# leaving the system alone. Debian bookworm packages only Compose v1; trixie packages v2. The
# package comes through apt, from this machine's own configured Debian mirror (so apt checks the
# archive's signature and the package's checksum), with a private state directory; nothing is
# installed system-wide.
set -euo pipefail
cd "$(dirname "$0")/.."
docker compose version >/dev/null 2>&1 && exit 0
mirror=$(docker/debian-mirror.sh)
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
mkdir -p "$state/lists/partial" "$state/archives/partial"
printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" > "$state/trixie.sources"
apt_private=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$state" -o "Dir::State::Lists=$state/lists"
             -o "Dir::Cache=$state" -o "Dir::Cache::Archives=$state/archives" -o APT::Sandbox::User=root)
apt-get "${apt_private[@]}" update -qq
(cd "$state" && apt-get "${apt_private[@]}" download -qq docker-compose)
mkdir -p ~/.docker/cli-plugins
dpkg-deb --fsys-tarfile "$state"/docker-compose_*.deb | tar -xO ./usr/libexec/docker/cli-plugins/docker-compose > ~/.docker/cli-plugins/docker-compose
chmod +x ~/.docker/cli-plugins/docker-compose
docker compose version
