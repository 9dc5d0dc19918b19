# smtp-bridge developer entry points. `make run` and `make test` bootstrap .venv themselves.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# A fixed development token shared by the receiver and the bridge in `make run`.
export WEBHOOK_TOKEN ?= dev-token-change-me

.PHONY: run test lint typecheck unit fuzz soak bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Debian: apt-get install python3 python3-venv)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	@mkdir -p var
	@echo "Starting the test receiver on https://127.0.0.1:8443 and the bridge on 127.0.0.1:2525 (Ctrl-C stops both)."
	@echo "Send a test mail:  swaks --server 127.0.0.1:2525 --to you@example.org --from me@example.com"
	@echo "       or:  $(BIN)/python -c \"import smtplib; smtplib.SMTP('127.0.0.1', 2525).sendmail('me@example.com', ['you@example.org'], 'Subject: hi\r\n\r\nhello\r\n')\""
	@trap 'kill 0' INT TERM EXIT; \
	  $(BIN)/smtp-bridge receive --dir var/receiver & \
	  for i in $$(seq 50); do [ -f var/receiver/ca.pem ] && break; sleep 0.1; done; \
	  $(BIN)/smtp-bridge serve --config config/bridge.yaml

lint: $(STAMP)
	$(BIN)/ruff format --check bridge tests bench
	$(BIN)/ruff check bridge tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Pure modules (parsers, adapters, policies) are held to a higher bar than I/O code.
PURE := bridge/mime.py,bridge/payload.py,bridge/retry.py,bridge/routing.py,bridge/config.py,bridge/pacing.py,bridge/dsn.py,bridge/providers/*

unit: $(STAMP)
	$(BIN)/coverage run -m pytest -q
	@printf 'branch coverage, all code: %s%% (gate 90)\n' "$$($(BIN)/coverage report --format=total)"
	@printf 'branch coverage, pure modules: %s%% (gate 97)\n' "$$($(BIN)/coverage report --include='$(PURE)' --format=total)"
	@$(BIN)/coverage report --fail-under=90 >/dev/null
	@$(BIN)/coverage report --include='$(PURE)' --fail-under=97 >/dev/null

test: lint typecheck unit

soak: $(STAMP)
	$(BIN)/python bench/soak.py --seconds 300 --kills 20 --clients 8

bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .coverage
