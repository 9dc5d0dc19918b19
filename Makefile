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

# The receiver and the bridge run in the background of one shell that waits for the bridge:
# Ctrl-C or a SIGTERM to make reaches the trap at once, which stops both cleanly (the bridge
# drains and exits 0). printf, not echo: dash's echo would turn the \r\n below into bytes.
run: $(STAMP)
	@mkdir -p var
	@echo "Starting the test receiver on https://127.0.0.1:8443 and the bridge on 127.0.0.1:2525 (Ctrl-C stops both)."
	@echo "Send a test mail:  swaks --server 127.0.0.1:2525 --to you@example.org --from me@example.com   (Debian: apt-get install swaks)"
	@printf '%s\n' "       or:  $(BIN)/python -c 'import smtplib; smtplib.SMTP(\"127.0.0.1\", 2525).sendmail(\"me@example.com\", [\"you@example.org\"], \"Subject: hi\\r\\n\\r\\nhello\\r\\n\")'"
	@printf '%s\n' "In another shell: $(BIN)/smtp-bridge queue list   (check-config and providers test also need: export WEBHOOK_TOKEN=$(WEBHOOK_TOKEN))"
	@echo "Delivered mail lands as JSON in var/receiver/messages/."
	@$(BIN)/smtp-bridge receive --dir var/receiver & rpid=$$!; \
	  for i in $$(seq 50); do [ -f var/receiver/ca.pem ] && break; sleep 0.1; done; \
	  $(BIN)/smtp-bridge serve --config config/bridge.yaml & spid=$$!; \
	  trap 'kill $$spid $$rpid 2>/dev/null' INT TERM; \
	  wait $$spid; status=$$?; \
	  while kill -0 $$spid 2>/dev/null; do wait $$spid; status=$$?; done; \
	  kill $$rpid 2>/dev/null; wait $$rpid 2>/dev/null; exit $$status

lint: $(STAMP)
	$(BIN)/ruff format --check bridge tests bench fuzz
	$(BIN)/ruff check bridge tests bench fuzz

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

# Fresh random seeds every batch; `make test` runs a short derandomized campaign.
fuzz: $(STAMP)
	$(BIN)/python -m fuzz.run --seconds $${FUZZ_SECONDS:-600}

bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .coverage
