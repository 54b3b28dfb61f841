# podmig — the two commands a newcomer runs are `make demo` and `make test`.
# Both run scripts/setup first when the machine is not set up yet (root needed).

CARGO ?= cargo
SETUP := scripts/setup

.PHONY: setup build test lint demo bench-engine bench-cluster crds clean

setup:
	@$(SETUP) --check || $(SETUP)

build:
	$(CARGO) build --workspace --bins

# Unit tests, then the integration tests against the real containerd/runc/CRIU stack.
test: setup build
	$(CARGO) test --workspace

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

demo: setup
	$(CARGO) build --release --workspace --bins
	target/release/podmig-e2e demo

bench-engine: setup
	$(CARGO) build --release --workspace --bins
	target/release/podmig-e2e bench-engine

bench-cluster: setup
	$(CARGO) build --release --workspace --bins
	target/release/podmig-e2e bench-cluster

# Regenerate the committed CRDs from the types in api/.
crds:
	$(CARGO) run -q -p podmig-daemon --bin podmig -- crds --write helm/podmig/crds

clean:
	$(CARGO) clean
