"""The offline loaders give the real pretrained models.

* The hooked SmolLM2-135M-Instruct reproduces the Hugging Face model's log-probs.
* EfficientNet-Lite0 carries real ImageNet weights: it recognises real photos from scikit-image.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import time  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tl_multimodal import loading  # noqa: E402
from tl_multimodal.loading import (  # noqa: E402
    load_efficientnet_lite0,
    load_hf_smollm2,
    smollm2_gguf_path,
)

SENTENCES = [
    "The cat sat on the mat, and the dog slept by the fire.",
    "Paris is the capital of France. Its most famous landmark is the Eiffel Tower.",
]
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967}  # coffee mug, espresso


@pytest.fixture(scope="session")
def hf_smollm2():
    """The Hugging Face model and tokenizer: the oracle."""
    start = time.perf_counter()
    model, tokenizer = load_hf_smollm2()
    print(f"\nload_hf_smollm2: {time.perf_counter() - start:.1f}s")
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2(hf_smollm2):
    """``load_smollm2()``, converting the oracle's weights instead of parsing the GGUF again.

    Parsing the GGUF file dominates load time (it is read three times per load: tokenizer,
    config, weights), and dequantization is deterministic, so the session reads it only once.
    ``load_smollm2`` only reads the HF weights (``load_state_dict`` copies them).
    """
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "load_hf_smollm2", lambda dtype=torch.float32: hf_smollm2)
        model = loading.load_smollm2()
    print(f"\nload_smollm2 (HF model already loaded): {time.perf_counter() - start:.1f}s")
    return model


@pytest.fixture(scope="session")
def effnet():
    start = time.perf_counter()
    model = load_efficientnet_lite0()
    print(f"\nload_efficientnet_lite0: {time.perf_counter() - start:.1f}s")
    return model


def test_gguf_path_exists():
    path = smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"


def test_smollm2_config_and_tokenizer(smollm2):
    cfg = smollm2.cfg
    assert cfg.model_name == "SmolLM2-135M-Instruct"
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab) == (30, 576, 1536, 49152)
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (9, 3, 64)
    # This tokenizer adds no BOS token; by default neither does the hooked model.
    assert smollm2.tokenizer is not None
    assert smollm2.tokenizer("Hello world").input_ids == [19556, 905]
    assert smollm2.to_tokens("Hello world").tolist() == [[19556, 905]]


@torch.no_grad()
def test_smollm2_matches_hf(smollm2, hf_smollm2):
    hf_model, tokenizer = hf_smollm2
    max_diff = 0.0
    for sentence in SENTENCES:
        tokens = smollm2.to_tokens(sentence)
        assert tokens[0].tolist() == tokenizer(sentence).input_ids
        hooked = torch.log_softmax(smollm2(tokens).double(), dim=-1)
        reference = torch.log_softmax(hf_model(tokens).logits.double(), dim=-1)
        max_diff = max(max_diff, (hooked - reference).abs().max().item())
    print(f"\nSmolLM2 hooked vs HF: max |log-prob diff| = {max_diff:.2e}")
    assert smollm2.W_E.data_ptr() != hf_model.model.embed_tokens.weight.data_ptr()
    assert max_diff < 1e-3


def _top5(model, image):
    config = timm.data.resolve_data_config({}, model=model)
    pixels = timm.data.create_transform(**config)(Image.fromarray(image)).unsqueeze(0)
    with torch.no_grad():
        probs = model(pixels).softmax(-1)[0]
        features = model.forward_features(pixels)
    return probs.topk(5), features


@pytest.mark.parametrize(
    "photo, expected", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)]
)
def test_efficientnet_recognises_real_photos(effnet, photo, expected):
    skimage_data = pytest.importorskip("skimage.data")
    (probs, classes), features = _top5(effnet, getattr(skimage_data, photo)())
    names = timm.data.ImageNetInfo()
    top5 = ", ".join(
        f"{c} {names.index_to_description(c)} ({p:.2f})"
        for p, c in zip(probs.tolist(), classes.tolist())
    )
    print(f"\nEfficientNet-Lite0 on skimage.data.{photo}(): {top5}")
    assert classes[0].item() in expected
    assert features.shape == (1, 1280, 7, 7)
