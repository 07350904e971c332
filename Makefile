# make demo: the main job on bundled sample photos.  make test: the test suite.
# make fuzz: the fuzz tests for longer.  make test-gpu: the GPU tests and the insightface parity
# tests on CUDA (needs an NVIDIA GPU).  All create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
GPU_STAMP := $(VENV)/.installed-gpu

# Seconds the decoder's fuzz test runs in make test (the path fuzz test keeps its own 10 s there),
# and each fuzz test of tests/fuzz in make fuzz.
FUZZ_SECONDS      ?= 20
FUZZ_LONG_SECONDS ?= 300
# ONNX Runtime providers the insightface parity tests run our pipeline on in make test-gpu.
GPU_TEST_PROVIDERS ?= cuda

.PHONY: install install-gpu demo test fuzz test-gpu lint bench-ingest bench-index bench-engines bench-dlib clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The demo's photos are the samples in the insightface wheel; --no-deps fetches only the files.
demo: install
	$(BIN)/pip install -q --no-deps insightface
	$(BIN)/python -m pipelines.demo --work demo

# pytest prints the 15 slowest tests at the end of every run (--durations=15 in pyproject.toml).
test: install
	$(BIN)/ruff check pipelines indexing tests bench
	$(BIN)/ruff format --check pipelines indexing tests bench
	FACEAUDIT_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q

# The fuzz tests alone, FUZZ_LONG_SECONDS each; each bounds its own libFuzzer process, so no
# pytest timeout (-s shows how many inputs each tried).
fuzz: install
	FACEAUDIT_FUZZ_SECONDS=$(FUZZ_LONG_SECONDS) FACEAUDIT_FUZZ_PATHS_SECONDS=$(FUZZ_LONG_SECONDS) \
		$(BIN)/python -m pytest -q -s --timeout=0 tests/fuzz

# onnxruntime (CPU, from the dev extra) and onnxruntime-gpu install the same module, and so do
# faiss-cpu and faiss-gpu-cu12: uninstall the CPU ones, then reinstall the GPU ones over what
# the uninstall removed, so that the GPU builds provide `onnxruntime` and `faiss`.
$(GPU_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,gpu]'
	$(BIN)/pip uninstall -q -y onnxruntime faiss-cpu
	$(BIN)/pip install -q --force-reinstall --no-deps \
		"onnxruntime-gpu==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')" \
		"faiss-gpu-cu12==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("faiss-gpu-cu12"))')"
	$(BIN)/python -c "import onnxruntime as o, sys; p = o.get_available_providers(); \
		sys.exit(0 if 'CUDAExecutionProvider' in p else f'onnxruntime offers only {p}: not the GPU build')"
	touch $(GPU_STAMP)

install-gpu: $(GPU_STAMP)

# The GPU-marked tests (wherever they are) and the insightface parity tests with our pipeline on
# GPU_TEST_PROVIDERS. No GPU is an error here, not a skip; FACEAUDIT_GPU_TESTS=1 runs the GPU tests
# even where the GPU is not /dev/nvidia0 (which is all tests/conftest.py looks for).
test-gpu: install-gpu
	@nvidia-smi -L >/dev/null 2>&1 || { echo "make test-gpu needs an NVIDIA GPU (nvidia-smi -L failed)"; exit 1; }
	FACEAUDIT_GPU_TESTS=1 $(BIN)/python -m pytest -q -m gpu tests
	@grep -q FACEAUDIT_TEST_PROVIDERS tests/unit/test_insightface_parity.py || \
		echo "warning: tests/unit/test_insightface_parity.py does not read FACEAUDIT_TEST_PROVIDERS: it runs on the CPU"
	FACEAUDIT_TEST_PROVIDERS=$(GPU_TEST_PROVIDERS) $(BIN)/python -m pytest -q tests/unit/test_insightface_parity.py

lint: install
	$(BIN)/ruff check pipelines indexing tests bench
	$(BIN)/ruff format --check pipelines indexing tests bench
	$(BIN)/mypy

bench-ingest: install
	$(BIN)/python bench/ingest.py

bench-index: install
	$(BIN)/python bench/index.py

bench-engines: install
	$(BIN)/python bench/engines.py

bench-dlib: install
	$(BIN)/python bench/dlib_nets.py

clean:
	rm -rf demo .bench runs-out
