PYTHON ?= python
OUT ?= out

.PHONY: install test test-fast demo toy-model notebooks bench clean

install:  ## CPU torch pinned; add the test and notebook extras
	$(PYTHON) -m pip install "torch==2.13.0" -e ".[test,notebooks]"

test:  ## the whole suite (CPU); what CI runs
	$(PYTHON) -m pytest -q

test-fast:  ## skip the full-size SD architectures
	$(PYTHON) -m pytest -q -m "not slow"

demo:  ## the main job on the embedded default model
	$(PYTHON) -m diffedit demo --out $(OUT)/demo

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
