#!/usr/bin/env bash
# `make deps`: installs the apt packages of ops/apt-packages.txt that are missing, and nothing else.
# Idempotent: a second run finds everything present and touches nothing (no apt-get update).
# Not root: prints the one sudo line that would install what is missing and fails.
# ZMESH_APT_PACKAGES names another list (tests use it).
set -euo pipefail
list=${ZMESH_APT_PACKAGES:-"$(dirname "$0")/apt-packages.txt"}
[ -r "$list" ] || { echo "make deps: cannot read the package list $list" >&2; exit 2; }
command -v dpkg-query >/dev/null || { echo "make deps: no dpkg-query: this installs apt packages on Debian/Ubuntu only" >&2; exit 2; }

# first field of each line, comments and blank lines skipped
mapfile -t wanted < <(sed -e 's/#.*//' "$list" | awk 'NF { print $1 }')
[ ${#wanted[@]} -gt 0 ] || { echo "make deps: $list lists no packages" >&2; exit 2; }
# one dpkg-query for all (it exits 1 when some are unknown to dpkg: that is what we are asking)
mapfile -t installed < <(dpkg-query -W -f='${db:Status-Status} ${Package}\n' "${wanted[@]}" 2>/dev/null \
                         | awk '$1 == "installed" { print $2 }' || true)
missing=()
for pkg in "${wanted[@]}"; do
  [[ " ${installed[*]} " == *" $pkg "* ]] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "make deps: all present (${#wanted[@]} packages from $list)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "make deps: ${#missing[@]} apt package(s) missing and this is not root; install them with:" >&2
  echo "sudo apt-get install -y ${missing[*]}"
  exit 1
fi
echo "make deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
