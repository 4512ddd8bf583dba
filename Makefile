PYTHON ?= python
OUT ?= out

.PHONY: install test test-fast demo toy-model eval notebooks bench clean

install:  ## CPU torch pinned (an unpinned torch pulls the multi-GB CUDA build); the test and notebook extras
	$(PYTHON) -m pip install -q "torch==2.13.0" -e ".[test,notebooks]"

test: install  ## installs what the tests need, then the whole suite (CPU); what CI runs
	$(PYTHON) -m pytest -q

test-fast: install  ## skip the full-size SD architectures
	$(PYTHON) -m pytest -q -m "not slow"

demo:  ## the main job on the embedded default model
	$(PYTHON) -m diffedit demo --out $(OUT)/demo

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info

toy-model:  ## retrain the shipped toy model in place (CPU, about 80 minutes)
	$(PYTHON) -m diffedit.toy.train --out diffedit/toy/weights --work $(OUT)/toy-train --seed 0

eval:  ## DiffEdit quality on the held-out shapes-world edits (benchmark, not a test)
	$(PYTHON) -m diffedit eval --out $(OUT)/eval.json

notebooks:  ## execute every notebook headless and save it with its outputs
	$(PYTHON) notebooks/build.py

bench:  ## speed and memory vs diffusers' DiffEdit pipeline on identical weights
	$(PYTHON) -m bench.run --out bench/results.json
