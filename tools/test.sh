#!/usr/bin/env bash
# Install everything the tests need, then run all of them: Rust unit tests,
# lint, and the Python suite against the built package over real sockets.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(swaks haproxy)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check ".[test]"

# pyo3's test binaries link libpython; tell the loader where it is.
LD_LIBRARY_PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
export PYO3_PYTHON="${PYO3_PYTHON:-$(command -v python3)}"
cargo test --release --lib
cargo clippy --release --all-targets --quiet -- -D warnings
python3 -m ruff check python tests benches
python3 -m ruff format --check python tests benches
python3 -m pytest "$@"
