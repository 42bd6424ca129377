# The developer loop. `make dev` once (and again after changing Rust); then
# each target runs one kind of check in seconds to a minute. The README's
# test command (bash tools/test.sh) runs everything, installs included.
.PHONY: dev deps test-rust test-py lint fmt docs docs-serve bench fuzz all

PYTEST ?= python3 -m pytest

# Editable install: Python edits are live, Rust edits need `make dev` again.
dev:
	python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[test,docs]"

# Debian packages, Exim, the bench peers: what tests against real peers need.
deps:
	bash tools/install-deps.sh

# One test: make test-rust ARGS=session::tests::auth
test-rust:
	cargo test --release --lib $(ARGS)

# One file or test: make test-py ARGS="tests/test_esmtp.py -k smtputf8"
test-py:
	$(PYTEST) $(ARGS)

lint:
	cargo clippy --release --all-targets --quiet -- -D warnings
	cargo clippy --release --all-targets --all-features --quiet -- -D warnings
	python3 -m ruff check python tests benches docs tools
	python3 -m ruff format --check python tests benches docs tools
	python3 -m mypy python/kumo_listener
	python3 -m mypy.stubtest kumo_listener._core
	python3 tools/module-cycles.py

fmt:
	cargo fmt
	python3 -m ruff check --fix python tests benches docs tools
	python3 -m ruff format python tests benches docs tools

docs:
	python3 -m mkdocs build --strict

docs-serve:
	python3 -m mkdocs serve

# The micro-benchmarks, then the end-to-end harness (about 15 minutes).
bench:
	cargo bench
	python3 -m benches.e2e

# Every fuzz target for SECONDS (default 20): make fuzz SECONDS=60
fuzz:
	bash tools/fuzz.sh $(SECONDS)

all:
	bash tools/test.sh
