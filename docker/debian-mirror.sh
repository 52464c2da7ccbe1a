#!/usr/bin/env bash
# Prints the Debian mirror this machine's apt is configured with (deb822 .sources files or a
# classic sources.list), so that the scripts here fetch from where the machine is allowed to,
# and no mirror's name is written into the repository.
set -euo pipefail
mirror=$( (cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2; exit}') || true)
[ -n "$mirror" ] || mirror=$( (awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null) || true)
[ -n "$mirror" ] || { echo "no Debian mirror is configured for apt on this machine" >&2; exit 1; }
echo "$mirror"
