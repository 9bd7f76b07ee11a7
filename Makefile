# pagkit set-up: `make demo` and `make test` each create the virtual environment, install pagkit with its
# dependencies and the Fashion-MNIST dataset (Debian package), then run. `make lint`: ruff and mypy (pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
# torch comes from this spec; on this project's CPU machines the 2.13.0 CPU wheel is on disk.
# For a CUDA build: make demo TORCH_SPEC="torch==2.5.1" (or any release your CUDA supports).
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN := $(VENV)/bin

.PHONY: install dataset browser demo test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

dataset:
	@if [ ! -f "$(DATA_DIR)/train-images-idx3-ubyte.gz" ] && [ ! -f "$(DATA_DIR)/train-images-idx3-ubyte" ]; then \
		echo "installing the Fashion-MNIST dataset (Debian package dataset-fashion-mnist)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# the browser of tests/test_app_ui.py (pagkit ui in headless chromium, driven by Playwright): Debian's chromium
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing the headless browser for the page tests (Debian package chromium)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; \
	fi

demo: install dataset
	$(BIN)/pagkit demo --out docs/demo.png

test: install dataset browser
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
