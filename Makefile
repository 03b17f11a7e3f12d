# The two commands of the README. Both set everything up on a fresh machine.
#   make speedrun   the main job
#   make test       the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nanoseek-installed
BASE_STAMP := $(VENV)/.nanoseek-base

.PHONY: install test browser speedrun bench clean

install: $(STAMP)

# the library alone (what `make speedrun` needs); `make test` adds the dev extras (transformers, openai, ...)
$(BASE_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@# torch first and pinned: a bare `torch` requirement would download a multi-GB CUDA build
	@# --no-compile, then bytecode for what the stages import: pip compiles every installed file one by one
	@# (25 of a fresh install's ~50 s); importing the stages once compiles the ~2,000 they use in ~10 s. It has to
	@# be written here: where PYTHONDONTWRITEBYTECODE is set, every process would compile them again (~3 s each)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e .
	@env -u PYTHONDONTWRITEBYTECODE $(PY) -W ignore::SyntaxWarning -c "import torch._dynamo, reasoning_gym, \
	  matplotlib.pyplot, nanoseek.stages.speedrun, nanoseek.stages.pretrain, nanoseek.stages.sft, \
	  nanoseek.stages.grpo, nanoseek.stages.sample, nanoseek.stages.evaluate, nanoseek.stages.generate, \
	  nanoseek.stages.distill, nanoseek.report"
	@touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest

# the chat page's test drives a real headless Chromium: Debian's package, installed here when we are root;
# otherwise the test is skipped and the summary says why
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium)); } \
	  || echo "WARNING: no chromium and cannot install it (apt-get install chromium as root): the browser test will skip"

# the whole recipe: pretrain → GRPO → rejection sampling → distillation → eval → runs/speedrun/report.md;
# stages already done are skipped, so an interrupted run resumes
speedrun: $(BASE_STAMP)
	$(VENV)/bin/nanoseek speedrun --out runs/speedrun

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/forward.py
	$(PY) bench/train_step.py
	$(PY) bench/grpo_step.py

clean:
	rm -rf $(VENV) build *.egg-info
