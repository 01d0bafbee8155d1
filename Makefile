# shop-mesh: every target sets up what it needs (.venv) on its own.
PY      := .venv/bin/python
VENV    := .venv/.installed
BIN     := .venv/bin
PYTEST_WORKERS ?= 4
# Node side (generated/ts, examples/node): npm workspaces, installed exactly from package-lock.json.
NODE_DEPS := node_modules/.installed

.PHONY: top k8s-render run test protos check-generated ts client-wheel lint-protos breaking proto-baseline lint fmt bench mesh-status clean

# The server (.) depends on the client distribution shop-mesh-api, installed from generated/ (editable).
$(VENV): pyproject.toml generated/pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y shop-mesh 2>/dev/null || true  # the server's old name, in existing venvs
	$(PY) -m pip install -q -e ./generated -e '.[dev]'
	touch $(VENV)

## run: the whole mesh locally (CA, services, Envoy sidecars, edge); Ctrl-C stops it
run: $(VENV)
	$(PY) -m shop_mesh.mesh run

## test: every check CI runs, then the test suite
test: $(VENV) check-generated lint-protos breaking lint
	# loadfile: tests of one file (one shared mesh, one bench run) stay on one worker.
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

## protos: regenerate generated/ from protos/ (the only way generated code is made): Python, then TypeScript
protos: $(VENV) $(NODE_DEPS)
	scripts/gen_protos.sh
	scripts/gen_ts.sh

check-generated: $(VENV) $(NODE_DEPS)
	@tmp=$$(mktemp -d); OUT=$$tmp scripts/gen_protos.sh >/dev/null; \
	if diff -r -q -x __pycache__ $$tmp/shop generated/shop && diff -r -q -x __pycache__ $$tmp/buf generated/buf; then echo "generated/ is up to date"; rm -rf $$tmp; \
	else echo "generated/ is stale: run 'make protos' and commit"; rm -rf $$tmp; exit 1; fi
	@tmp=$$(mktemp -d); OUT_BASE=$$tmp scripts/gen_ts.sh >/dev/null; \
	if diff -r -q $$tmp/generated/ts/src generated/ts/src; then echo "generated/ts is up to date"; rm -rf $$tmp; \
	else echo "generated/ts is stale: run 'make protos' and commit"; rm -rf $$tmp; exit 1; fi

$(NODE_DEPS): package.json package-lock.json generated/ts/package.json examples/node/package.json
	npm ci --no-audit --no-fund
	touch $(NODE_DEPS)

## ts: compile the TypeScript package (generated/ts/dist) and the Node example (examples/node/dist)
ts: $(NODE_DEPS)
	npm run build

## client-wheel: build the client distribution shop-mesh-api into dist/ (the stubs alone)
client-wheel: $(VENV)
	rm -rf generated/build  # setuptools' build/ keeps modules that generated/ no longer has
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist ./generated

# buf reads the contracts as an image that protoc builds (scripts/proto_image.sh): buf alone cannot
# resolve buf/validate/validate.proto. --path shop: lint and compare our files, not the imports.
lint-protos: $(VENV)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; scripts/proto_image.sh $$tmp/image.binpb && \
	$(BIN)/buf lint $$tmp/image.binpb --path shop
	$(BIN)/buf format --diff --exit-code

## breaking: the contracts against the last released baseline (protos/baseline.json)
breaking: $(VENV)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; scripts/proto_image.sh $$tmp/image.binpb && \
	$(BIN)/buf breaking $$tmp/image.binpb --path shop --against protos/baseline.json

## proto-baseline: accept the current contracts as the released baseline (a deliberate, reviewed step)
proto-baseline: $(VENV)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; scripts/proto_image.sh $$tmp/image.binpb && \
	$(BIN)/buf build $$tmp/image.binpb --path shop -o protos/baseline.json

lint: $(VENV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shop_mesh k8s tests

fmt: $(VENV)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)
	$(PY) -m shop_mesh.bench all

## k8s-render: re-render k8s/ files derived from shop_mesh/mesh/topology.yaml (CI fails on drift)
k8s-render: $(VENV)
	$(PY) -m k8s.render

mesh-status: $(VENV)
	$(PY) -m shop_mesh.mesh status

## top: live RPS, success rate, latency, streams and the saga of the running mesh (make run first)
top: $(VENV)
	$(PY) -m shop_mesh.mesh top

clean:
	rm -rf .run .data build *.egg-info generated/build generated/*.egg-info dist generated/ts/dist examples/node/dist
