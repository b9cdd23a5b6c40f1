"""scripts/eval_nll.py on a folder in the COCO-sample layout made here (any split name): its three
lines end with the NLLs that per-caption forward passes of the model give (the oracle)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_vlm, tiny_hf

from tl_multimodal.training.features import encode_images

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_nll.py"
CAPTIONS = [["a red square", "red"], ["a green thing"], ["blue blue", "a blue square on white"]]


@pytest.fixture(scope="module")
def eval_nll():
    spec = importlib.util.spec_from_file_location("eval_nll", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(backend, gpt2_tokenizer, vit_encoder):
    """A 2-layer GPT-2 (d_model 64, random weights) behind the tiny ViT, on each backend."""
    hf = tiny_hf("gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=128, n_ctx=64, dtype=torch.float32, seed=7,
                 init=0.1, widen=1.0)
    return build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i, (rgb, caps) in enumerate(zip([(220, 20, 20), (20, 200, 20), (20, 20, 220)], CAPTIONS)):
        Image.fromarray(np.full((40, 30, 3), rgb, dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", "image_id": i, "split": "val", "captions": caps})
    rows.append({"file_name": "images/0.png", "image_id": 9, "split": "other", "captions": ["not this one"]})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _oracle(model, feats, pairing):
    """Mean NLL per caption token from one forward pass per caption (model's own loss, end-of-text included)."""
    total = count = 0
    captions = [c for caps in CAPTIONS for c in caps]
    for caption, img in zip(captions, pairing):
        text = caption + model.tokenizer.eos_token
        if img is None:
            ids = model.to_tokens(text, prepend_bos=False)
            tokens = torch.cat([torch.tensor([[model.start_token_id]]), ids], 1)
            nll = model(tokens, return_type="loss", loss_per_token=True)
        else:
            nll = model(text, image_features=feats[img:img + 1], return_type="loss", loss_per_token=True)
            nll = nll[:, -(model.to_tokens(text, prepend_bos=False).shape[1]):]
        total, count = total + nll.sum().item(), count + nll.numel()
    return total / count


@pytest.mark.parametrize("bos", [False, True])
def test_three_lines_end_with_the_oracle_nlls(eval_nll, model, folder, capsys, monkeypatch, bos):
    monkeypatch.setattr(model.projection.info, "bos", bos)
    eval_nll.main(["--data-dir", str(folder), "--split", "val", "--threads", "1"], model=model)
    out = capsys.readouterr().out
    lines = {name: line for name in ("(a) matched image", "(b) shuffled image", "(c) no image")
             for line in out.splitlines() if name in line}
    assert len(lines) == 3 and "3 images, 5 captions" in out
    got = {name: float(line.split()[-1]) for name, line in lines.items()}
    with torch.no_grad():
        from tl_multimodal.data.sources import load_coco_mini
        feats = encode_images(model, load_coco_mini(folder, "val"), progress=False)
        owner = [i for i, caps in enumerate(CAPTIONS) for _ in caps]
        wrong = eval_nll.shuffled_pairing(torch.tensor(owner), 3).tolist()
        assert all(w != o for w, o in zip(wrong, owner))
        want = {"(a) matched image": _oracle(model, feats, owner), "(b) shuffled image": _oracle(model, feats, wrong),
                "(c) no image": _oracle(model, feats, [None] * 5)}
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-4), name
    assert ("[BOS][image][text]" in out) == bos and "soft-prompt norm median" in out


def test_limit_and_unknown_split(eval_nll, model, folder, capsys):
    eval_nll.main(["--data-dir", str(folder), "--split", "val", "--limit", "2", "--threads", "1"], model=model)
    assert "2 images, 3 captions" in capsys.readouterr().out
    with pytest.raises(ValueError, match="split 'dev' not in"):
        eval_nll.main(["--data-dir", str(folder), "--split", "dev", "--threads", "1"], model=model)
    with pytest.raises(SystemExit):
        eval_nll.main(["--data-dir", str(folder), "--split", "val", "--limit", "1"], model=model)
    with pytest.raises(ValueError, match="at least 2 images"):
        eval_nll.main(["--data-dir", str(folder), "--split", "other", "--threads", "1"], model=model)
