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

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

soak: $(STAMP)
	$(BIN)/python bench/soak.py --seconds 300 --kills 20 --clients 8

bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
