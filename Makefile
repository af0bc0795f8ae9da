PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-tiling gpu-check clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (set PY=...)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bulkdet demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the heavy end-to-end tests (kill/resume, Ctrl-C, Ray, Chromium, torch) and the
# GPU ones: under two minutes on 2 cores. `make test` (what CI runs) is the whole suite.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# --tile against SAHI: small objects found with and without tiles, tiles/s, peak memory on a
# 100-megapixel JPEG (docs/tiling.md). SAHI and Ultralytics need torch (about 6 GB with its CUDA
# wheels, which also run on the CPU): they get their own venv, kept out of the project's and CI's.
SAHI_VENV := .venv-sahi
$(SAHI_VENV)/.installed:
	test -x $(SAHI_VENV)/bin/python || $(PY) -m venv $(SAHI_VENV)
	$(SAHI_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(SAHI_VENV)/bin/python -m pip install -q ultralytics==8.4.190 sahi==0.12.8 onnxruntime==1.32.0
	touch $@

bench-tiling: $(STAMP) $(SAHI_VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.tiling --sahi-python $(SAHI_VENV)/bin/python $(BENCH_ARGS)

# No venv stamp on the GPU test machine: it has no venv and no package index, and runs the system
# python3 with the carried packages on PYTHONPATH (docs/gpu-and-precision.md). Here: the venv when
# there is one, else python3 when it has the basics, else the venv is made as for the other
# targets. GPU_CHECK_PY=... chooses; GPU_CHECK_ARGS="--budget-s 150 --skip-tests" e.g. for a rerun.
# Without a usable GPU it is the CPU dry run.
gpu-check:
	@py="$(GPU_CHECK_PY)"; \
	if [ -z "$$py" ] && [ -x $(BIN)/python ]; then py=$(BIN)/python; fi; \
	if [ -z "$$py" ] && python3 -c "import numpy, pyarrow" 2>/dev/null; then py=python3; fi; \
	if [ -z "$$py" ]; then $(MAKE) --no-print-directory $(STAMP) && py=$(BIN)/python; fi; \
	echo "$$py -m benchmarks.gpu_check $(GPU_CHECK_ARGS)"; \
	$$py -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(SAHI_VENV) demo-out
