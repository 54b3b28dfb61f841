# podmig — the two commands a newcomer runs are `make demo` and `make test`.
# Both run scripts/setup first when the machine is not set up yet (root needed).

CARGO ?= cargo
SETUP := scripts/setup

.PHONY: setup build test lint fuzz soak demo bench bench-engine bench-cluster testapp-bin crds clean compat-table compat-repeat image kubectl-plugin

setup:
	@$(SETUP) --check || $(SETUP)

build:
	$(CARGO) build --workspace --bins

# Unit tests, then the integration tests against the real containerd/runc/CRIU stack.
# Every suite runs even when one fails; the last lines name the failed tests.
test: setup build
	CARGO=$(CARGO) scripts/run-tests

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	command -v cargo-deny >/dev/null || $(CARGO) install --locked cargo-deny --version 0.20.2
	$(CARGO) deny --offline check licenses bans sources

# The property tests of what a peer sends (stream receiver, layer and volume archives),
# run long: `make test` runs 256 cases of each.
fuzz:
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} $(CARGO) test -p podmig-cri-ext -p podmig-daemon --lib -- \
	  any_bytes_are_answered_and_nothing_passed_leaves any_stream_is_answered_and_stays_in_its_directories

# The fault soak: 50 cross-node moves (16 and 256 MiB) between a containerd 1.6 node and
# a containerd 2.x node, each with one fault at a random moment (a daemon, the controller
# or containerd killed, a node cut off, the API server down); `make test` runs ten.
soak: setup
	$(CARGO) build --release --workspace --bins
	target/release/podmig-e2e soak --moves $${SOAK_MOVES:-50}

demo: setup
	$(CARGO) build --release --workspace --bins
	target/release/podmig-e2e demo

# The static test app the engine benchmark runs outside containers (setup builds it for
# the images; a fresh clone or `cargo clean` needs it built here).
testapp-bin:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --quiet --release \
	  -p podmig-testapp --target x86_64-unknown-linux-gnu --target-dir target/testapp

# Cross-node moves: podmig vs delete-and-recreate vs the thesis' order (downtime).
bench: setup
	$(CARGO) build --release --workspace --bins
	target/release/podmig-e2e bench

bench-engine: setup testapp-bin
	$(CARGO) build --release --workspace --bins
	PODMIG_TESTAPP_BIN=$(CURDIR)/target/testapp/x86_64-unknown-linux-gnu/release/testapp \
	  target/release/podmig-e2e bench-engine

bench-cluster: setup
	$(CARGO) build --release --workspace --bins
	target/release/podmig-e2e bench-cluster

# podmig's container image (podmig.local/podmig:latest, a docker-archive tarball in
# target/images/podmig.tar) from the release binaries, for the chart's image.repository.
image: setup
	$(CARGO) build --release --workspace --bins
	scripts/build-images --podmig target/release target/images

# Rewrites the README's compatibility table from a run of the compatibility suite.
compat-table: setup build
	PODMIG_WRITE_README=1 $(CARGO) test -p podmig-e2e --test compat -- --nocapture

# MariaDB across nodes 20 times in a row, its writer working through each move
# (`make test` runs 4).
compat-repeat: setup build
	PODMIG_REPEAT_MOVES=$${PODMIG_REPEAT_MOVES:-20} $(CARGO) test -p podmig-e2e --test compat -- \
	  --nocapture mariadb_moves_across_nodes_again_and_again

# Regenerate the committed CRDs from the types in api/.
crds:
	$(CARGO) run -q -p podmig-daemon --bin podmig -- crds --write helm/podmig/crds

clean:
	$(CARGO) clean

# The kubectl plugin: `kubectl podmig …` finds kubectl-podmig on the PATH.
PREFIX ?= /usr/local
kubectl-plugin:
	$(CARGO) build --release -p podmig-daemon --bin kubectl-podmig
	install -m 0755 target/release/kubectl-podmig $(PREFIX)/bin/kubectl-podmig
