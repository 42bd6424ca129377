#!/usr/bin/env bash
# Build the abi3 wheel, install it into a fresh virtual environment with no
# Rust toolchain on PATH, and run the command from it: `check` on a TOML
# file, then `serve` receiving one message over smtplib, then SIGTERM.
#
#   bash tools/wheel-smoke.sh            # build with --release (quick)
#   WHEEL=dist/x.whl bash tools/wheel-smoke.sh   # test a wheel built already
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

wheel=${WHEEL:-}
if [ -z "$wheel" ]; then
  command -v maturin >/dev/null 2>&1 ||
    python3 -m pip install --quiet --disable-pip-version-check 'maturin>=1.9.4,<2'
  maturin build --release --features abi3 --quiet --out "$work/dist"
  wheel=$(echo "$work"/dist/kumo_listener-*.whl)
fi
case "$wheel" in
  *-cp311-abi3-*.whl) ;;
  *) echo "wheel-smoke: expected an abi3 wheel for cp311, got $wheel" >&2; exit 1 ;;
esac

python3 -m venv "$work/venv"
# The wheel itself, never a build from source; its dependencies (prometheus_client) from the index.
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: "$wheel"

# From here on: the venv and the system's binaries only, and not this tree.
cd "$work"
env -i HOME="$work" PATH="$work/venv/bin:/usr/bin:/bin" bash -euo pipefail -c '
if command -v cargo || command -v rustc; then
  echo "wheel-smoke: a Rust toolchain is on PATH" >&2; exit 1
fi
printf "[via.\"10.0.0.1\"]\nhostname = \"mx.example.com\"\n" > params.toml
kumo-listener check params.toml
printf "hostname = 7\n" > bad.toml
if kumo-listener check bad.toml 2>/dev/null; then
  echo "wheel-smoke: check accepted hostname = 7" >&2; exit 1
fi
python - <<"EOF"
import re, signal, smtplib, subprocess
from pathlib import Path

import kumo_listener

assert kumo_listener.__file__.startswith(str(Path.cwd() / "venv")), kumo_listener.__file__
served = subprocess.Popen(
    ["kumo-listener", "serve", "--listen", "127.0.0.1:0", "--maildir", "maildir"],
    stdout=subprocess.PIPE, text=True,
)
try:
    line = served.stdout.readline()
    host, port = re.search(r"listening on ([\d.]+):(\d+)", line).groups()
    with smtplib.SMTP(host, int(port), timeout=10) as client:
        client.sendmail("a@b.example", ["c@d.example"], b"Subject: wheel\r\n\r\nfrom the wheel\r\n")
    served.send_signal(signal.SIGTERM)
    assert served.wait(timeout=30) == 0
finally:
    served.kill()
[stored] = Path("maildir/new").iterdir()
assert stored.read_bytes().endswith(b"Subject: wheel\r\n\r\nfrom the wheel\r\n")
print(f"wheel-smoke: OK ({kumo_listener.__file__})")
EOF
'
echo "wheel-smoke: $(basename "$wheel") installs and serves without cargo"
