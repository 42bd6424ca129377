#!/usr/bin/env bash
# Everything the tests need that a fresh machine lacks, installed if missing;
# quiet, and safe to run again. tools/test.sh runs it first; a test that finds
# a tool missing fails and names this script (tests/support.py), never skips.
# - Debian: swaks (and its TLS modules), HAProxy, Postfix (configured as "No
#   configuration"), Dovecot's LMTP server, openssl: the tests run private
#   instances, never the system's. iproute2's `ip` makes the network
#   namespaces of the cluster test (tests/netns.py).
# - The package itself with its test and docs extras (pytest, ruff, mypy,
#   cryptography, MkDocs Material), built from this tree.
# - Exim, unpacked beside Postfix (tools/exim.sh), and what the end-to-end
#   benchmark runs against (tools/install-bench-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(swaks libnet-ssleay-perl libio-socket-ssl-perl haproxy postfix openssl dovecot-core dovecot-lmtpd redis-server iproute2 opendkim-tools libmail-dkim-perl)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  # No system service is started by the packages (Dovecot's would): the
  # tests run private instances. Only a policy-rc.d of our own is removed.
  ours=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && ours=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -z "$ours" ] || rm -f /usr/sbin/policy-rc.d
fi

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore ".[test,docs]"
bash tools/exim.sh
bash tools/install-bench-deps.sh
