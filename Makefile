# diffalign: `make demo` (install + the main job) and `make test` (install + the whole suite).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
# The torch installed when the environment has none. A user with CUDA keeps the torch already in $(VENV)
# (or passes VENV_FLAGS=--system-site-packages to use the system's).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test browser bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/diffalign train --preset ddpo-shapes

test: install browser
	$(PY) -m pytest -q

# What the real-browser test (tests/serve/test_serve_page.py) needs: Playwright's Python package and Debian's
# Chromium, which it drives (Playwright's own browser download needs the network; the test launches /usr/bin/chromium).
SUDO := $(shell [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null && echo sudo)
browser: install
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q playwright
	test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || $(SUDO) apt-get install -y -q chromium \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

bench: install
	$(PY) benchmarks/bench_ddpo.py

clean:
	rm -rf $(VENV) runs .pytest_cache
