# VMCP developer targets. `make build` leaves the release binary at ./build/vmcp-api;
# `make test` runs every test (real-VMM tests skip loudly when the VMMs are absent).

CARGO ?= cargo
BUF := ./node_modules/.bin/buf
GUEST := .cache/guest/vmcp-test-guest.elf

.PHONY: build run test generate lint dev install-tools bench clean guest fuzz o11y o11y-stop

build:
	$(CARGO) build --release --locked --bin vmcp-api
	mkdir -p build
	cp target/release/vmcp-api build/vmcp-api

run: build
	./build/vmcp-api

test: guest
	$(CARGO) test --locked

# Code generation runs in build.rs (protox + connectrpc-build, no protoc needed);
# touching the proto forces it to run again.
generate:
	touch proto/vmm/v1/vm.proto
	$(CARGO) build --locked

lint: $(BUF)
	$(BUF) lint
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

$(BUF):
	npm ci --no-audit --no-fund

dev:
	@if command -v watchexec >/dev/null 2>&1; then \
		watchexec -r -e rs,proto,toml -- $(CARGO) run --bin vmcp-api; \
	elif $(CARGO) watch --version >/dev/null 2>&1; then \
		$(CARGO) watch -x 'run --bin vmcp-api'; \
	else \
		echo "make dev: no file watcher found; install one with 'cargo install --locked watchexec-cli' (or cargo-watch), or use 'make run'"; \
		exit 1; \
	fi

install-tools:
	npm ci --no-audit --no-fund
	rustup component add rustfmt clippy
	command -v as >/dev/null 2>&1 || (apt-get update && apt-get install -y binutils)

# The tiny PVH test guest used by the real-VMM tests (written to .cache/, git-ignored).
guest: $(GUEST)

$(GUEST): tests/guest/guest.S tests/guest/guest.ld tests/guest/build.sh
	tests/guest/build.sh

bench: guest
	$(CARGO) bench --locked --bench vmcp

fuzz:
	scripts/fuzz.sh 60

o11y:
	scripts/o11y.sh start

o11y-stop:
	scripts/o11y.sh stop

clean:
	$(CARGO) clean
	rm -rf build .cache
