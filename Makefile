# VMCP developer targets. `make build` leaves the release binaries at ./build/vmcp-api and
# ./build/vmcpctl, with vmcpctl's man pages and shell completions beside them; `make install`
# installs them, the systemd unit and the environment file; `make test` runs every test
# (real-VMM tests skip loudly when the VMMs are absent).

CARGO ?= cargo
BUF := ./node_modules/.bin/buf
GUEST := .cache/guest/vmcp-test-guest.elf
# Where cargo puts the release binaries (CARGO_TARGET_DIR when set).
RELEASE_DIR := $(or $(CARGO_TARGET_DIR),target)/release

# Installation layout; DESTDIR stages it (packaging), PREFIX=/usr for a distribution layout.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/vmcp
SYSCONFDIR ?= /etc
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system

.PHONY: build run test generate lint dev install-tools bench clean guest fuzz o11y o11y-stop \
	install uninstall

build:
	$(CARGO) build --release --locked --bin vmcp-api --bin vmcpctl
	mkdir -p build/man
	cp $(RELEASE_DIR)/vmcp-api $(RELEASE_DIR)/vmcpctl build/
	build/vmcpctl man --dir build/man
	build/vmcpctl completions bash > build/vmcpctl.bash
	build/vmcpctl completions zsh > build/_vmcpctl
	build/vmcpctl completions fish > build/vmcpctl.fish

# Both binaries, vmcpctl's man pages and completions, the docs, the systemd unit (pointed at
# BINDIR and SYSCONFDIR) and, unless one is already there, the environment file (0600: it may
# name secrets). Then: systemctl daemon-reload && systemctl enable --now vmcp
install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(DOCDIR) \
		$(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	install -d -m 0700 $(DESTDIR)$(SYSCONFDIR)/vmcp
	install -m 0755 build/vmcp-api build/vmcpctl $(DESTDIR)$(BINDIR)/
	install -m 0644 build/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 build/vmcpctl.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/vmcpctl
	install -m 0644 build/_vmcpctl $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_vmcpctl
	install -m 0644 build/vmcpctl.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/vmcpctl.fish
	install -m 0644 README.md docs/SECURITY.md $(DESTDIR)$(DOCDIR)/
	sed -e 's|/usr/bin/vmcp-api|$(BINDIR)/vmcp-api|' \
		-e 's|/etc/vmcp/vmcp.env|$(SYSCONFDIR)/vmcp/vmcp.env|' \
		-e 's|/usr/share/doc/vmcp|$(DOCDIR)|' \
		deploy/vmcp.service > $(DESTDIR)$(SYSTEMDUNITDIR)/vmcp.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/vmcp.service
	if [ -e $(DESTDIR)$(SYSCONFDIR)/vmcp/vmcp.env ]; then \
		echo "kept $(DESTDIR)$(SYSCONFDIR)/vmcp/vmcp.env (deploy/vmcp.env has the current defaults)"; \
	else \
		install -m 0600 deploy/vmcp.env $(DESTDIR)$(SYSCONFDIR)/vmcp/vmcp.env; \
	fi
	@echo "installed; start with: systemctl daemon-reload && systemctl enable --now vmcp"

# Removes what install put there, except the environment file and the VMs' state.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/vmcp-api $(DESTDIR)$(BINDIR)/vmcpctl \
		$(DESTDIR)$(MANDIR)/man1/vmcpctl.1 $(DESTDIR)$(MANDIR)/man1/vmcpctl-*.1 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/vmcpctl \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions/_vmcpctl \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/vmcpctl.fish \
		$(DESTDIR)$(SYSTEMDUNITDIR)/vmcp.service
	rm -rf $(DESTDIR)$(DOCDIR)

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
	$(CARGO) build --release --locked --examples
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
