# bfb — the two commands that matter are `make run` and `make test`.

TOOLS := $(CURDIR)/.tools
# Test tools installed by scripts/install-test-tools.sh come first on PATH.
export PATH := $(TOOLS)/venv/bin:$(PATH)

BUF := $(TOOLS)/buf/node_modules/.bin/buf

.PHONY: run test test-tools bench lint lint-tools fmt release contracts-baseline

## Run the demo: simulated downstream services and bfb in one process.
## Flags through ARGS, e.g. make run ARGS='--sim-latency 5ms'.
ARGS ?=
run:
	cargo run --release --locked --bin bfb -- demo $(ARGS)

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
	cargo bench --locked --bench batch
	cargo bench --locked --bench balance
	cargo bench --locked --bench memory
	cargo bench --locked --bench baseline

## The release binary, built exactly as the Dockerfile builds it.
release:
	cargo build --release --locked --bin bfb

## Formatting, clippy (warnings as errors), and the contracts: buf lint, and
## buf breaking against the released contracts (buf/released.binpb).
lint: lint-tools
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	$(BUF) lint
	$(BUF) breaking --against buf/released.binpb

lint-tools:
	./scripts/install-lint-tools.sh

## When releasing contract versions: record them as the new baseline that
## `make lint` checks changes against (see docs/versioning.md).
contracts-baseline: lint-tools
	$(BUF) build -o buf/released.binpb

fmt:
	cargo fmt --all
