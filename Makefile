# aimesh: the two commands a newcomer runs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(shell find protos -name '*.proto' | sort)

.PHONY: run test proto lint bench venv clean check-proto etcd

venv: $(STAMP)

# Re-install when the package metadata changes; editable, so code edits need nothing.
$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || { echo "creating $(VENV) ..."; $(PYTHON) -m venv $(VENV); }
	@echo "installing aimesh and its dev dependencies into $(VENV) ..."
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry/proto/ which, depending on the order pip
	@# installs in, overwrites opentelemetry-proto's (then the OTLP exporter cannot import
	@# InstrumentationScope): put opentelemetry-proto's own files back.
	$(PY) -m pip install --quiet --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	@touch $@

run: $(STAMP)
	$(VENV)/bin/aimesh demo

# The etcd store's tests start their own etcd on free ports, and the metrics test its own
# Prometheus: install them first if need be.
test: $(STAMP)
	@scripts/install-etcd.sh
	@scripts/install-prometheus.sh
	@scripts/install-chromium.sh  # the control plane's web page is tested in headless Chromium
	@scripts/install-node-clients.sh  # grpc-js (+ xDS plugin) clients in tests/node
	$(PY) -m pytest $(PYTEST_ARGS)

# Regenerates gen/ (grpcio + .pyi) and clients/betterproto (betterproto2) from protos/.
proto: $(STAMP)
	$(PY) -m aimesh.mesh.protogen --out-gen gen --out-clients clients/betterproto

lint: $(STAMP)
	$(VENV)/bin/ruff check mesh interceptors clients tests bench
	$(VENV)/bin/ruff format --check mesh interceptors clients/__init__.py clients/inference.py \
		clients/mesh_channel.py tests bench
	$(PY) mesh/typecheck_tree.py .
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p aimesh.mesh -p aimesh.interceptors \
		-m aimesh.clients -m aimesh.clients.inference -m aimesh.clients.mesh_channel

bench: $(STAMP)
	$(PY) -m bench

# A local etcd for `aimesh control-plane --store etcd://127.0.0.1:2379`, in the foreground
# (Ctrl-C stops it; data in .etcd-data). Installs Debian's etcd-server first if needed.
etcd: $(STAMP)
	scripts/install-etcd.sh
	$(PY) -m aimesh.mesh.control.etcd_server --data-dir .etcd-data --port 2379

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
