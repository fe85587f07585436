# make run   - set everything up and run the whole system (web, five workers, beat, Flower)
# make test  - set everything up and run every test
# Servers: the ones named in the environment or .env, else embedded PostgreSQL + Redis.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: run test lint format services-up services-down clean-data venv

venv: $(STAMP)

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=python3.11)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(PY) -m devstack run

test: $(STAMP)
	$(PY) -m pip check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m devstack test $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

services-up: $(STAMP)
	$(PY) -m devstack services up

services-down: $(STAMP)
	$(PY) -m devstack services down

clean-data: services-down
	rm -rf .data
