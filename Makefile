# The two commands of icd: `make demo` runs the main job, `make test` runs ruff + pytest.
# Both create .venv when missing, install the pinned dependencies and build the extension.

PYTHON_SYS ?= python3
VENV       := .venv
PYTHON     := $(VENV)/bin/python
BUILD_STAMP := $(VENV)/.build-deps-stamp
DEPS_STAMP := $(VENV)/.deps-stamp
EXT_STAMP  := $(VENV)/.ext-stamp
EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

# CUDA kernels are compiled whenever nvcc and a CUDA torch are present (ICD_NO_CUDA=1 skips them).
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

empty :=
space := $(empty) $(empty)

.PHONY: install test demo ops-demo lint bench clean gpu-check gpu-check-quick gpu-wheels

$(PYTHON):
	$(PYTHON_SYS) -m venv $(VENV)

# What building the extension needs (torch and the build tools, at requirements-dev.txt's pins)
# goes in first; then the extension compiles while the other dependencies install beside it
# (`install` runs the two in parallel: pip is mostly one core and disk, the compile both cores).
BUILD_DEPS := torch setuptools wheel ninja numpy
$(BUILD_STAMP): requirements-dev.txt | $(PYTHON)
	$(PYTHON) -m pip install --upgrade-strategy only-if-needed \
	  $$(grep -E '^($(subst $(space),|,$(BUILD_DEPS)))==' requirements-dev.txt)
	touch $@

$(DEPS_STAMP): requirements-dev.txt requirements-ultralytics.txt requirements-rtdetr.txt | $(BUILD_STAMP)
	$(PYTHON) -m pip install --upgrade-strategy only-if-needed -r requirements-dev.txt
	$(PYTHON) -m pip install --no-deps -r requirements-ultralytics.txt
	$(PYTHON) -m pip install --no-deps -r requirements-rtdetr.txt
	touch $@

$(EXT_STAMP): requirements-dev.txt $(EXT_SOURCES) | $(BUILD_STAMP)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	touch $@

install:
	@$(MAKE) --no-print-directory -j2 $(DEPS_STAMP) $(EXT_STAMP)

lint: install
	$(VENV)/bin/ruff check .

# pytest-xdist: one worker per core (worksteal: an idle worker takes queued tests from a busy one, so a
# few long tests do not end the run on one core); then the tests marked serial (torchrun, several
# processes, timing), one at a time with the whole machine
TEST_WORKERS ?= auto
test: install
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest tests -q -ra -n $(TEST_WORKERS) --dist worksteal -m "not serial" --durations=15
	$(PYTHON) -m pytest tests -q -ra -m serial --durations=5

demo: install
	$(PYTHON) -m icd demo --out demo_output

ops-demo: install
	$(PYTHON) examples/ops_demo.py

bench: install
	$(PYTHON) benchmarks/run_attention.py --quick

# The GPU check (benchmarks/gpu_check.py; benchmarks/README.md "GPU check"): on a machine with an
# NVIDIA GPU, with the python that holds its CUDA torch (GPU_PYTHON; not .venv's pins, which a
# GPU image without network cannot install). It builds the extension for that GPU itself.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
PYVER ?= 3.12

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-quick:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py --quick $(GPU_CHECK_ARGS)

# the pinned wheels a GPU image without network lacks, into .wheels/ (carried to the device)
gpu-wheels:
	$(PYTHON_SYS) benchmarks/gpu_check.py --download-wheels --python-version $(PYVER)

clean:
	rm -rf build *.egg-info icd/_C*.so $(EXT_STAMP)
