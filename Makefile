# The two commands of the README. Each sets up .venv on a fresh machine first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow setup browser-deps speech-deps font-deps llamacpp clean

setup: $(STAMP)

# CUDA machines get pip's default (CUDA) torch wheel; elsewhere the CPU build, installed first so
# that no other requirement pulls the multi-GB CUDA one.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q $(TORCH); \
	fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup speech-deps font-deps
	$(VENV)/bin/kosmo demo --out out

test: setup browser-deps speech-deps font-deps
	$(PY) -m pytest -q

# The playground's browser test drives Debian's Chromium through Playwright.
browser-deps:
	command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium)

# The world's spoken sentences are synthesised by Debian's espeak-ng.
speech-deps:
	command -v espeak-ng >/dev/null 2>&1 || (apt-get update && apt-get install -y espeak-ng)

# The world's signs and web-page mockups set their text in DejaVu Sans, from Debian's fonts-dejavu-core.
font-deps:
	test -f /usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf || (apt-get update && apt-get install -y fonts-dejavu-core)

test-slow: setup
	$(PY) -m pytest -q -m slow

# llama.cpp's Python binding, compiled from source, for the slow suite's GGUF check (`make llamacpp test-slow`).
# Not part of setup: the build takes many minutes. GGML_NATIVE=OFF builds for any x86-64, not just this CPU.
llamacpp: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -e '.[llamacpp]'

clean:
	rm -rf $(VENV) out
