#!/usr/bin/env bash
# Install everything the tests need, then run all of them: Rust unit tests,
# lint, the Python suite against the built package over real sockets, every
# fuzz target for a bounded time, and the benchmarks once in their quick mode
# (so that they cannot rot; their numbers mean nothing here).
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(swaks libnet-ssleay-perl libio-socket-ssl-perl haproxy postfix openssl)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  # Postfix's package would configure the system's instance: not at all (tests/test_lmtp.py runs its own).
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check ".[test]"
# Exim, the real BDAT client of tests/test_chunking.py, unpacked beside
# Postfix rather than installed (their packages conflict).
bash tools/exim.sh

# Without the `python` feature nothing links libpython: the unit tests,
# benches and fuzz targets run as they are. Clippy checks the crate both
# without and with it (the PyO3 layer, rust/py).
cargo test --release --lib
cargo clippy --release --all-targets --quiet -- -D warnings
cargo clippy --release --all-targets --all-features --quiet -- -D warnings
python3 -m ruff check python tests benches
python3 -m ruff format --check python tests benches
# The stubs of the compiled core against the installed module.
python3 -m mypy.stubtest kumo_listener._core
python3 -m pytest "$@"
# The abi3 wheel, installed into a fresh venv without cargo, runs.
bash tools/wheel-smoke.sh

bash tools/fuzz.sh "${FUZZ_SECONDS:-15}"

cargo bench --no-run --quiet
cargo clippy --release --all-targets --quiet --manifest-path benches/starttls-load/Cargo.toml -- -D warnings
python3 benches/python_params.py --quick
python3 benches/e2e.py --quick
