# The one test command CI runs (`.ci/run` calls `make test`). Each tier is its own target so it
# can be run alone; `make test` runs them in order and stops at the first failure.
#
#   make test        lint + unit + e2e (real control plane) + chart + kind
#   make demo        unwedge on a local control plane with simulated GPU nodes
#
# Both first run tools/prereqs.sh, which fails in seconds with what to install (as root on
# Debian/Ubuntu it installs the missing Debian packages itself).
#
# The end-to-end test binaries and the benches' short modes run in parallel lanes (tools/lanes.sh,
# LANES=2 by default: the reference machine's 2 cores); each starts its own kube-apiserver, etcd,
# controller-manager, scheduler and kwok on free ports, and runs its own tests one at a time.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
LANES ?= 2

.PHONY: test lint test-unit test-e2e test-bench test-lanes test-kind images release demo binaries \
	bins cluster crds prereqs-demo prereqs-test test-build chart-docs

test: prereqs-test lint chart-docs test-unit test-lanes test-kind

# What this machine lacks for `make demo` / `make test`, before any build.
prereqs-demo prereqs-test:
	bash tools/prereqs.sh $(@:prereqs-%=%)

# Formatting, clippy on every target, and the generated CRD YAML is current.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) run -q -p unwedge-crds --bin crdgen -- --check

# The chart README's values table is what helm-docs generates from values.yaml (helm-docs built
# from its Go module once, into ~/.cache/unwedge). `tools/helm-docs/check.sh --write` updates it.
chart-docs:
	bash tools/helm-docs/check.sh

# Every crate's own tests (everything except the e2e crate).
test-unit:
	$(CARGO) test --workspace --exclude e2e

# The pinned upstream binaries (kube-apiserver, etcd, kwok, kubectl, helm, ...), built once
# into ~/.cache/unwedge and reused.
binaries:
	bash e2e/cluster/build-binaries.sh

# The workspace binaries the end-to-end tests run as real processes (agent, operator, injector,
# kubectl plugin). Built before the tests: cargo holds its lock while tests run.
bins:
	$(CARGO) build -p unwedge-agent -p unwedge-operator -p kubectl-unwedge -p uevent-inject -p e2e --bins

# Compiles what test-unit, test-e2e and test-bench run, and runs nothing (.ci/run does it while
# the Go builds run). The same commands as those tiers: each package selection resolves its own
# features (unwedge-agent has `fixtures` only when its own tests are built), so a single
# `cargo build --workspace --all-targets` would leave the e2e variants to build later.
test-build: bins
	$(CARGO) test --workspace --exclude e2e --no-run
	$(CARGO) test -p e2e --no-run

# End to end on a real local control plane: foundation, admission, chart (helm lint/template/
# install with Helm 3 and 4), kubectl plugin, observability, DRA, the scenarios.
test-e2e: binaries bins
	LANES=$(LANES) CARGO=$(CARGO) bash tools/lanes.sh e2e

# The benchmarks in their short mode (bench storm, chaos and time-to-cordon --short): proves they still run and
# still assert the invariants.
test-bench: binaries bins
	LANES=$(LANES) CARGO=$(CARGO) bash tools/lanes.sh bench

# test-e2e and test-bench in one pool of lanes (what `make test` runs).
test-lanes: binaries bins
	LANES=$(LANES) CARGO=$(CARGO) bash tools/lanes.sh e2e bench

# The FROM-scratch images as OCI layouts, linux/amd64 and linux/arm64 (static musl builds; no
# Docker daemon). UNWEDGE_ARCHES=amd64 builds one platform.
images:
	bash images/build.sh

# The release: images, chart, kubectl plugin archives and krew manifest for linux/amd64 and
# linux/arm64; with REGISTRY=host[:port][/path] pushed there (images with crane, the chart with
# helm push), digests printed. PLAIN_HTTP=1 for a registry without TLS.
release:
	bash tools/release.sh $(if $(REGISTRY),--registry $(REGISTRY)) $(if $(PLAIN_HTTP),--plain-http)

# kind with real kubelets: offline node image, fake GPU device plugin, a local OCI registry that
# the release is pushed to, helm install from it by digest, scenarios.
test-kind:
	bash e2e/kind/run.sh

# unwedge on a local control plane with simulated GPU nodes: injects a wedge and shows the
# recovery live. `make demo ARGS=--keep` leaves the cluster up and prints its kubeconfig.
# The demo builds only the upstream binaries a control plane needs on its first start
# (CONTROL_PLANE_BINARIES in e2e/src/cluster.rs: no helm4).
demo: prereqs-demo bins
	$(CARGO) run -q -p e2e --bin demo -- $(ARGS)

# A local control plane with the CRDs, up until Ctrl-C (prints the kubeconfig path).
cluster:
	$(CARGO) run -q -p e2e --bin cluster -- up

# Regenerate the CRD YAML from the API types.
crds:
	$(CARGO) run -q -p unwedge-crds --bin crdgen
