# cplink developer entry points.
CARGO ?= cargo
# Where scripts/setup.sh and scripts/kube.sh keep what they install.
CPLINK_CACHE ?= $(HOME)/.cache/cplink
# Python with the pinned helm-python-sdk (made by scripts/setup.sh).
PYTHON ?= $(CPLINK_CACHE)/venv/bin/python
export CPLINK_PYTHON := $(PYTHON)
# Where cargo puts what it builds (honours CARGO_TARGET_DIR, as cargo does).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
# Where `make install-plugin` installs kubectl-cplink: $(PREFIX)/bin.
PREFIX ?= $(HOME)/.local

.PHONY: all build test lint fmt crds metric-names demo demo-down bench bench-scale setup kube install-plugin

all: build

## setup: install what the build and tests need on a fresh Debian machine
setup:
	./scripts/setup.sh

## build: debug build of every crate
build:
	$(CARGO) build --workspace --all-targets

## kube: install etcd, containerd, runc and the CNI plugins; build the real control plane,
# kubelet and pause that the end-to-end tests run (cached)
kube:
	./scripts/kube.sh

## test: formatting, lints, generated-file drift, the chart and every test (what CI runs)
# The end-to-end tests run the operator, server and agent binaries as processes and in cplink's
# image on real nodes (kubelet and containerd in namespaces, which need root); cargo builds a
# package's binaries for its own integration tests only, so build them all first.
test: lint kube
	$(PYTHON) -m pytest -p no:cacheprovider tests/helm -q
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --all-targets --no-fail-fast

## lint: rustfmt and clippy, warnings are errors
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## crds: regenerate the CRD from the operator's types, in crds/ and in the chart (whose
# templates/crds.yaml renders it, so that `helm upgrade` updates it)
crds:
	$(CARGO) run --quiet -p cplink-operator --bin crdgen > crds/controlplanelinks.cplink.dev.yaml
	cp crds/controlplanelinks.cplink.dev.yaml charts/cplink/files/crds/controlplanelinks.cplink.dev.yaml

## metric-names: list the metric families the binaries export, which the chart's alerts and
# dashboard may name (tests/helm checks them against it)
metric-names:
	$(CARGO) run --quiet -p cplink-e2e --bin cplink-metric-names > tests/helm/exported-metrics.txt

## install-plugin: build the kubectl plugin (release) and install it as $(PREFIX)/bin/kubectl-cplink
# kubectl finds it on the PATH: `kubectl cplink status`.
install-plugin:
	$(CARGO) build --release --locked -p cplink-cli
	install -D -m 0755 $(TARGET_DIR)/release/kubectl-cplink $(PREFIX)/bin/kubectl-cplink

## demo: a local Kubernetes cluster with cplink, kube-apiserver wired through the tunnel
# Returns once `kubectl logs` works through the tunnel; the cluster keeps running until
# `make demo-down`.
demo: setup kube
	$(CARGO) build --quiet --workspace --bins
	$(TARGET_DIR)/debug/cplink-demo up

## demo-down: stop the cluster `make demo` started
demo-down:
	$(CARGO) build --quiet -p cplink-e2e --bin cplink-demo
	$(TARGET_DIR)/debug/cplink-demo down

## bench: tunnel versus direct TCP, printed as a table of ratios (release build of the real
# cplink-server and cplink-agent, run as processes)
bench:
	$(CARGO) build --release --quiet -p cplink-server -p cplink-agent -p cplink-e2e --bin cplink-server --bin cplink-agent --bin cplink-bench
	$(TARGET_DIR)/release/cplink-bench --markdown

## bench-scale: one server, 5 000 agents and 100 000 idle tunneled connections, then 5 000
## EndpointSlice watches on kube-apiserver (release build)
bench-scale:
	$(CARGO) build --release --quiet -p cplink-server -p cplink-e2e --bin cplink-server --bin cplink-scale --bin cplink-watch-load
	$(TARGET_DIR)/release/cplink-scale
	$(TARGET_DIR)/release/cplink-watch-load
