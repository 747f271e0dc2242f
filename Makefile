# Shoal: the two commands of the README, and a few more.
CARGO ?= cargo
NODES ?= 3

.PHONY: run test build lint fmt bench bench-compare clean chaos

## Build, then start a local cluster with development certificates (Ctrl-C stops it).
run:
	$(CARGO) build --release --bin shoal
	./target/release/shoal dev --nodes $(NODES)

## The whole suite: unit tests, then integration tests against real node processes.
test:
	$(CARGO) build --bin shoal
	$(CARGO) test --workspace --no-fail-fast

build:
	$(CARGO) build --release --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Single-node benchmark over QUIC; figures go to docs/benchmarks.md by hand.
bench:
	$(CARGO) build --release --bin shoal --bin shoal-bench
	./target/release/shoal-bench single-node

## Side by side with rnacos: installs rnacos 0.8.8 if it is missing, then runs the same
## scenarios against a 3-node rnacos cluster and a 3-node Shoal cluster on loopback, one
## after the other. COMPARE_ARGS passes options (see `shoal-bench compare --help`).
bench-compare:
	@command -v rnacos >/dev/null 2>&1 || test -x "$$HOME/.cargo/bin/rnacos" || \
		$(CARGO) install rnacos --version 0.8.8 --locked || \
		$(CARGO) install rnacos --version 0.8.8
	$(CARGO) build --release --bin shoal --bin shoal-bench
	./target/release/shoal-bench compare $(COMPARE_ARGS)

clean:
	$(CARGO) clean
	rm -rf .shoal

## The chaos suite, including its long run (ignored in `make test`: 10 seeds, about 15
## minutes; see docs/reliability.md). SEED=N replays one schedule.
chaos:
	$(CARGO) build --bin shoal
	SHOAL_CHAOS_SEED=$(SEED) $(CARGO) test -p shoal-tests --test chaos --test chaos_partition -- --include-ignored --test-threads 1
