# Two commands do everything: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# triton: the CUDA torch wheel brings its own; a CPU torch does not, so on Linux
# we add the version the tests run under TRITON_INTERPRET=1 with.
TRITON_PIN := triton==3.9.0

.PHONY: demo test venv clean experiments gpu-check

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	@if [ "$$(uname -s)" = "Linux" ]; then $(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q $(TRITON_PIN); fi
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) demo.py

# one pytest worker per core (pytest-xdist), one thread each; --dist loadfile keeps a
# file's tests (and its module fixtures) on one worker
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile tests

experiments: venv
	$(PY) experiments.py all

# every GPU number (kernels, MFU, decoding, the GPU tests) on one CUDA device in under
# ~8 minutes: out/gpu_check/gpu_check.json and .md (gpu_check.py; --dry_run checks it on a CPU)
gpu-check: venv
	$(PY) gpu_check.py

clean:
	rm -rf out
