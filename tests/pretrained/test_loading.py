"""The offline loaders give the real pretrained models.

* The hooked SmolLM2-135M-Instruct reproduces the Hugging Face model's log-probs.
* EfficientNet-Lite0 carries real ImageNet weights: it recognises real photos from scikit-image.
* The converted-model cache gives the same weights (bit for bit) and the same tokenizer as converting
  the GGUF file; a damaged cache entry is rebuilt with a warning; ``clear_cache`` deletes it.
* The bridge backend's cache (the dequantised HF model) likewise: the second ``load_offline_bridge``
  does not read the GGUF file and gives the same weights, tokens and logits; a changed GGUF file gets
  a new entry. The HookedTransformer tests skip on TransformerLens 4.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tl_multimodal.pretrained import offline as loading  # noqa: E402
from tl_multimodal.pretrained.offline import (  # noqa: E402
    load_efficientnet_lite0,
    load_hf_smollm2,
    smollm2_gguf_path,
)

try:  # TransformerLens 3; TransformerLens 4 has no HookedTransformer (the hooked loader's tests skip)
    from transformer_lens import HookedTransformer
except ImportError:
    HookedTransformer = None

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
def cache_root(tmp_path_factory):
    """An empty cache folder for this session (``$TL_MULTIMODAL_CACHE``), not the user's."""
    return tmp_path_factory.mktemp("tl_multimodal_cache")


@pytest.fixture(scope="session")
def smollm2(hf_smollm2, cache_root):
    """``load_smollm2()`` with a cold cache, converting the oracle's weights instead of parsing the GGUF again.

    Parsing the GGUF file dominates load time (it is read three times per load: tokenizer,
    config, weights), and dequantization is deterministic, so the session reads it only once.
    ``load_smollm2`` only reads the HF weights (``load_state_dict`` copies them). This load writes
    the cache entry that the cache tests read.
    """
    if HookedTransformer is None:
        pytest.skip("load_smollm2 builds a HookedTransformer, which TransformerLens 4 removed")
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(loading.CACHE_ENV, str(cache_root))
        patch.setattr(loading, "load_hf_smollm2", lambda dtype=torch.float32: hf_smollm2)
        model = loading.load_smollm2()
    print(f"\nload_smollm2 (HF model already loaded): {time.perf_counter() - start:.1f}s")
    return model


def _gguf_not_read(dtype=torch.float32):
    raise AssertionError("the GGUF file was converted although the cache holds it")


def _assert_same_model(model, reference):
    """Bit-identical weights, the same config and the same tokenizer behaviour."""
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different
    assert model.cfg.to_dict() == reference.cfg.to_dict()
    tok, ref = model.tokenizer, reference.tokenizer
    assert tok.get_vocab() == ref.get_vocab()
    assert tok.all_special_tokens == ref.all_special_tokens
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.padding_side)
    texts = SENTENCES + ["", "<|im_start|>user\nHi there!<|im_end|>", "  spaces\tand\nnewlines  ", "héllo wörld 😀"]
    for text in texts:
        assert tok(text).input_ids == ref(text).input_ids, text
        assert model.to_str_tokens(text) == reference.to_str_tokens(text), text
    assert torch.equal(model.to_tokens(SENTENCES), reference.to_tokens(SENTENCES))


def test_cached_load_equals_converted_load(smollm2, cache_root, monkeypatch):
    entry = next(cache_root.glob("smollm2-*"))
    assert (entry / "weights.pt").is_file() and (entry / "tokenizer").is_dir()
    monkeypatch.setenv(loading.CACHE_ENV, str(cache_root))
    monkeypatch.setattr(loading, "load_hf_smollm2", _gguf_not_read)
    start = time.perf_counter()
    cached = loading.load_smollm2()
    print(f"\nload_smollm2 from the cache: {time.perf_counter() - start:.1f}s")
    _assert_same_model(cached, smollm2)


def _truncate_weights(entry):
    data = (entry / "weights.pt").read_bytes()
    (entry / "weights.pt").write_bytes(data[: len(data) // 3])


def _break_tokenizer(entry):
    (entry / "tokenizer" / "tokenizer.json").write_text("{ not json")


@pytest.mark.parametrize("damage", [_truncate_weights, _break_tokenizer])
def test_damaged_cache_is_rebuilt(smollm2, hf_smollm2, cache_root, monkeypatch, damage):
    monkeypatch.setenv(loading.CACHE_ENV, str(cache_root))
    entry = loading.smollm2_cache_path()
    damage(entry)
    monkeypatch.setattr(loading, "load_hf_smollm2", lambda dtype=torch.float32: hf_smollm2)
    with pytest.warns(UserWarning, match="SmolLM2 cache .* cannot be read .*rebuilding it"):
        rebuilt = loading.load_smollm2()
    _assert_same_model(rebuilt, smollm2)
    monkeypatch.setattr(loading, "load_hf_smollm2", _gguf_not_read)  # the entry was rewritten
    _assert_same_model(loading.load_smollm2(), smollm2)


def test_cache_dir_and_clear_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(loading.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "tl_multimodal"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loading.cache_dir() == tmp_path / "home" / ".cache" / "tl_multimodal"

    root = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_ENV, str(root))
    assert loading.cache_dir() == root
    assert loading.clear_cache() == 0  # nothing to clear
    (root / "smollm2-x" / "tokenizer").mkdir(parents=True)
    (root / "smollm2-x" / "weights.pt").write_bytes(b"w" * 1000)
    (root / "smollm2-x" / "tokenizer" / "tokenizer.json").write_bytes(b"t" * 24)
    assert loading.clear_cache() == 1024
    assert not root.exists()
    root.write_text("a file, not a cache folder")
    with pytest.raises(ValueError, match="is not a folder"):
        loading.clear_cache()
    assert root.is_file()


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)
    assert loading.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"changed")  # a new size (and mtime) is hashed again, not served from the memo
    assert loading.file_sha256(path) == hashlib.sha256(b"changed").hexdigest()


# ---------------------------------------------------------------------------- the bridge backend's cache
def _oracle_copy(hf_smollm2):
    """What ``load_hf_smollm2`` gives, as a fresh copy (the bridge wraps the HF model in place)."""
    calls = []

    def load(dtype=torch.float32):
        calls.append(1)
        return copy.deepcopy(hf_smollm2[0]), copy.deepcopy(hf_smollm2[1])

    return load, calls


def _assert_same_bridge(model, reference):
    """Bit-identical HF weights, the same config, tokens and logits (text and image prompts)."""
    ours, theirs = model.bridge.original_model.state_dict(), reference.bridge.original_model.state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different
    assert model.cfg.d_vocab == reference.cfg.d_vocab and model.cfg.n_layers == reference.cfg.n_layers
    tok, ref = model.tokenizer, reference.tokenizer
    assert tok.get_vocab() == ref.get_vocab() and tok.all_special_tokens == ref.all_special_tokens
    assert (tok.bos_token, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token, ref.eos_token_id, ref.pad_token_id)
    texts = SENTENCES + ["", "<|im_start|>user\nHi there!<|im_end|>", "héllo wörld 😀"]
    for text in texts:
        assert model.to_str_tokens(text) == reference.to_str_tokens(text), text
    tokens = model.to_tokens(SENTENCES)
    assert torch.equal(tokens, reference.to_tokens(SENTENCES))
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))
        assert torch.equal(model("A picture of", images=pixels), reference("A picture of", images=pixels))


def test_bridge_cache_is_written_once_and_read_next_time(hf_smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    load, calls = _oracle_copy(hf_smollm2)
    monkeypatch.setattr(loading, "load_hf_smollm2", load)
    converted = loading.load_offline_bridge()
    assert calls == [1]
    folder = loading.smollm2_hf_cache_path()
    assert folder.parent.name.startswith("smollm2-") and folder.parent.parent == tmp_path
    assert json.loads((folder / "tl_multimodal.json").read_text())["gguf_sha256"] == \
        loading.file_sha256(smollm2_gguf_path())
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    monkeypatch.setattr(loading, "load_hf_smollm2", _gguf_not_read)
    start = time.perf_counter()
    cached = loading.load_offline_bridge()
    print(f"\nload_offline_bridge from the cache: {time.perf_counter() - start:.1f}s")
    _assert_same_bridge(cached, converted)
    hf_model, tokenizer = hf_smollm2  # and the HF oracle itself
    tokens = cached.to_tokens(SENTENCES[0], prepend_bos=False)  # the bridge's default prepends <|im_start|>
    assert tokens[0].tolist() == tokenizer(SENTENCES[0]).input_ids
    with torch.no_grad():  # the bridge runs the HF modules through its own components: as close as the hooked model
        diff = (cached(tokens).double().log_softmax(-1) - hf_model(tokens).logits.double().log_softmax(-1)).abs().max()
    print(f"SmolLM2 bridge (cached) vs HF: max |log-prob diff| = {diff:.2e}")
    assert diff < 1e-3

    (folder / "model.safetensors").write_bytes(b"not safetensors")  # damaged: rebuilt from the GGUF, with a warning
    monkeypatch.setattr(loading, "load_hf_smollm2", load)
    with pytest.warns(UserWarning, match="SmolLM2 cache .* cannot be read .*rebuilding it"):
        rebuilt = loading.load_offline_bridge()
    assert calls == [1, 1]
    _assert_same_bridge(rebuilt, converted)
    monkeypatch.setattr(loading, "load_hf_smollm2", _gguf_not_read)  # the entry was rewritten
    _assert_same_bridge(loading.load_offline_bridge(), converted)


def test_bridge_cache_follows_the_gguf_file(hf_smollm2, tmp_path, monkeypatch):
    """Another GGUF file (other bytes) gets its own entry: the first load from it converts again."""
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    load, calls = _oracle_copy(hf_smollm2)
    monkeypatch.setattr(loading, "load_hf_smollm2", load)
    loading.load_offline_bridge(projection=False)
    first = loading.smollm2_hf_cache_path()
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another GGUF file")
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: other)
    assert loading.smollm2_hf_cache_path() != first
    loading.load_offline_bridge(projection=False)
    assert calls == [1, 1] and loading.smollm2_hf_cache_path().is_dir() and first.is_dir()
    stamp = loading.smollm2_hf_cache_path() / "tl_multimodal.json"
    stamp.write_text(json.dumps({"format": loading._CACHE_FORMAT, "gguf_sha256": "0" * 64}))  # not this file's
    with pytest.warns(UserWarning, match="is not a cache entry for this GGUF file"):
        loading.load_offline_bridge(projection=False)
    assert calls == [1, 1, 1]
    assert loading.clear_cache() > 0 and not (tmp_path / "cache").exists()


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
