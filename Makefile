# make run   - set everything up and run the whole system (web, five workers, beat, Flower)
# make test  - set everything up and run every test
# Servers: the ones named in the environment or .env, else embedded PostgreSQL + Redis.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# One virtualenv for every make target, with the development set (requirements-dev.txt,
# which includes the runtime set requirements.txt): `make run` needs its embedded servers
# and honcho too. The image installs the runtime set only (Dockerfile). The stamp names
# a checksum of both files, so a change to either reinstalls.
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: run test browser chaos bench lint format services-up services-down clean-data venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=python3.11)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(PY) -m devstack run

test: $(STAMP) browser
	$(PY) -m pip check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	DEBUG=True $(VENV)/bin/mypy
	$(PY) -m devstack test $(ARGS)

# The admin's browser test (tests/test_admin.py) drives Debian's Chromium through Playwright,
# never a browser Playwright downloads. Installed here when missing and we can (root, apt);
# otherwise that one test is skipped and says why.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the admin's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| echo "make: could not install chromium: the admin's browser test will be skipped"; \
	else echo "make: no $(CHROMIUM), and installing it needs root and apt: the admin's browser test will be skipped"; fi

# make chaos ARGS="--orders 2000 --kills 20 --broker-restarts 2 --seed 7 [--replicas 2]": faults while orders
# flow (with --replicas, two of each worker and of beat, as on two hosts), then the audit
chaos: $(STAMP)
	$(PY) -m devstack chaos $(ARGS)

# make bench ARGS="--orders 2000 --rate 20 --fail-rate 0.1 --broker redis|amqp [--rounds 3] [--history 1000000]":
# throughput and latency of the whole saga beside a bare Celery chain and a one-process floor,
# in one run; writes bench/results/latest.json and latest.png (BENCHMARKS.md)
bench: $(STAMP)
	$(PY) -m bench $(ARGS)

# lint-imports: the boundaries between the services (pyproject.toml, [tool.importlinter]);
# mypy: the product's types ([tool.mypy]; the django-stubs plugin loads the settings, which
# need DEBUG on outside a deployment). The same checks run in pre-commit.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	DEBUG=True $(VENV)/bin/mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

services-up: $(STAMP)
	$(PY) -m devstack services up

services-down: $(STAMP)
	$(PY) -m devstack services down

clean-data: services-down
	rm -rf .data
