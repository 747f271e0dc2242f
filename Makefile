# Shoal: the two commands of the README, and a few more.
CARGO ?= cargo
NODES ?= 3

.PHONY: run test build lint fmt bench bench-compare clean chaos docker-image docker-up docker-down docker-clean

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

## Containers (deploy/README.md): the node image, FROM scratch with a static binary.
COMPOSE ?= docker-compose -p shoal -f deploy/docker-compose.yml
SHOAL_STATIC = target/static/$(shell rustc -vV | sed -n 's/^host: //p')/release/shoal

docker-image:
	./deploy/build-image.sh

## A 3-node cluster in containers on a network of its own; prints how to use it.
docker-up: docker-image
	$(COMPOSE) up -d
	@mkdir -p target/docker
	docker cp "$$($(COMPOSE) ps -q node-1)":/ca/ca.pem target/docker/ca.pem
	@echo
	@echo "Shoal in containers: node-1 172.28.0.11, node-2 172.28.0.12, node-3 172.28.0.13"
	@echo "(QUIC on port 7400, HTTP on 7401). From this machine:"
	@echo
	@echo "  export SHOAL_SERVERS=172.28.0.11:7400,172.28.0.12:7400,172.28.0.13:7400"
	@echo "  export SHOAL_CA=target/docker/ca.pem"
	@echo "  $(SHOAL_STATIC) members"
	@echo "  curl http://172.28.0.11:7401/metrics"
	@echo
	@echo "make docker-down stops it (its volumes stay); make docker-clean removes them too."

docker-down:
	$(COMPOSE) down

docker-clean:
	$(COMPOSE) down -v
