# bfb — the two commands that matter are `make run` and `make test`.

TOOLS := $(CURDIR)/.tools
# Test tools installed by scripts/install-test-tools.sh come first on PATH.
export PATH := $(TOOLS)/venv/bin:$(PATH)

.PHONY: run test test-tools bench lint fmt release

## Run the demo: simulated downstream services and bfb in one process.
run:
	cargo run --release -- demo

## Run every test (unit, integration over loopback, grpcurl interop),
## installing the tools the tests need first.
test: test-tools
	cargo test --locked

test-tools:
	./scripts/install-test-tools.sh

## Benchmarks (see docs/performance.md for figures and the machine).
bench:
	cargo bench --locked --bench fanout
	cargo bench --locked --bench hedge

## The release binary, built exactly as the Dockerfile builds it.
release:
	cargo build --release --locked --bin bfb

## Formatting and clippy, warnings as errors.
lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

fmt:
	cargo fmt --all
