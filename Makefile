.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@.venv/bin/python -m pipeline.demo

test: setup
	@.venv/bin/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'pytest collected no tests' >&2; exit 1; fi; exit $$rc

bench: setup
	@.venv/bin/python -m bench.engine

clean:
	rm -rf .venv build *.egg-info demo_output
