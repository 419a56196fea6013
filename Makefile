# One entry point for setup, running and testing. `make install` is idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.ember-installed

.PHONY: install up test test-py test-terraform lint clean wheel

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools
	# The pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

up: install
	$(BIN)/ember up

test: install test-py test-terraform

test-py: install
	$(BIN)/python -m pytest -q

test-terraform:
	bash terraform/test.sh

# The wheel terraform's user data installs (ember_package = "s3://<bucket>/<key>.whl"):
#   make wheel && aws s3 cp dist/ember-0.1.0-py3-none-any.whl s3://my-artifacts/
DIST ?= dist
wheel:
	rm -rf build $(DIST)/ember-*.whl
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w $(DIST) .
	rm -rf build
	@ls $(DIST)/ember-*.whl

lint: install
	$(BIN)/ruff check ember tests loadtests

clean:
	rm -rf $(VENV) .pytest_cache build dist
