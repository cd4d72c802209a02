# The two commands of the README: `make run` and `make test`. Both install what they need.
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test generate demo-checkpoint

setup:
	bash scripts/setup.sh

demo-checkpoint: setup
	@test -f .demo/tiny/config.json || .venv/bin/mdl-serve make-checkpoint --preset tiny --out .demo/tiny

generate: demo-checkpoint
	.venv/bin/mdl-serve generate --model .demo/tiny

run: demo-checkpoint
	.venv/bin/mdl-serve serve --model .demo/tiny --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)
