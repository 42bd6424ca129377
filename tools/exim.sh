#!/usr/bin/env bash
# Exim as an SMTP client for tests/test_chunking.py, without installing its
# Debian package (it conflicts with Postfix, which other tests use): the
# packages' files extracted under /var/tmp/kumo-exim, its compiled-in user
# Debian-exim, and /usr/sbin/exim4 pointing at the extracted binary (Exim
# re-executes itself from that path). Idempotent; needs root and Debian's
# archive. Prints Exim's version.
set -euo pipefail

root=/var/tmp/kumo-exim/root
binary=$root/usr/sbin/exim4
libraries=(libidn12 libgnutls-dane0 libgnutls30 libidn2-0 libnsl2 libdb5.3 libpcre2-8-0 libcrypt1)

if [ ! -x "$binary" ]; then
  missing=()
  for package in "${libraries[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  # Readable by apt's sandbox user, so that it downloads without a warning.
  chmod 755 "$scratch"
  if ! (cd "$scratch" && apt-get download -qq exim4-daemon-light exim4-base) 2>/dev/null; then
    apt-get update -qq
    (cd "$scratch" && apt-get download -qq exim4-daemon-light exim4-base)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  mkdir -p "$root"
  for deb in "$scratch"/*.deb; do
    dpkg -x "$deb" "$root"
  done
fi
id Debian-exim >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin Debian-exim
# A real Exim (its package installed) is left as it is.
if [ -L /usr/sbin/exim4 ] || [ ! -e /usr/sbin/exim4 ]; then
  ln -sfn "$binary" /usr/sbin/exim4
fi
/usr/sbin/exim4 -C /dev/null -bV 2>/dev/null | head -n 1
