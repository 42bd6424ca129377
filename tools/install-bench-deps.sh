#!/usr/bin/env bash
# What the end-to-end benchmark (python3 -m benches.e2e) runs against, installed
# if missing; quiet, and safe to run again. The harness installs nothing: it
# checks for all of this and names this script when something is missing.
# - Debian's postfix: smtp-source (the load), smtp-sink, and the private Postfix
#   of the durable and memory comparisons. Configured as "No configuration", so
#   no system mail service is set up; the harness runs its own instance.
# - aiosmtpd (the Python server compared) and cryptography (its certificates).
# - benches/starttls-load, the Rust STARTTLS load client (its own workspace).
# - Debian's redis-server, for the shared per-client limits (the harness starts
#   its own on loopback; the system's service may stay stopped).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s redis-server >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

if ! dpkg -s postfix >/dev/null 2>&1; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix >/dev/null
fi

missing=()
for module in aiosmtpd cryptography; do
  python3 -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ ${#missing[@]} -gt 0 ]; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${missing[@]}"
fi

cargo build --quiet --release --manifest-path benches/starttls-load/Cargo.toml
