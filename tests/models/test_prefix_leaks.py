"""HookedVisionPrefix does not leak into its parent (issue #25): the shared config is left as the LM's, the
weights keep the parent's memory layout, ``generate`` accepts what ``HookedTransformer.generate`` accepts,
the parent's state dict loads (strictly, into the LM), and token ids outside the vocabulary are refused.
Oracle: the parent HookedTransformer itself, on the same inputs."""

import numpy as np
import pytest
import torch

from tl_multimodal import HookedVisionPrefix
from tl_multimodal._validate import check_flag, check_generation_options, check_int, check_number, check_token_ids

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4: only the checks of _validate run
    HookedTransformer = None

needs_hooked_transformer = pytest.mark.skipif(
    HookedTransformer is None, reason="HookedVisionPrefix needs HookedTransformer, which TransformerLens 4 removed")


def _lm(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=50257, n_ctx=64, act_fn="gelu",
               normalization_type="LN", model_name="tiny")
    cfg.update(kw)
    return HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tok).eval()


@pytest.fixture(scope="module")
def parent(gpt2_tokenizer):
    if HookedTransformer is None:
        pytest.skip("HookedVisionPrefix needs HookedTransformer, which TransformerLens 4 removed")
    return _lm(gpt2_tokenizer)


@pytest.fixture(scope="module")
def child(parent, vit_encoder):
    torch.manual_seed(3)
    return HookedVisionPrefix(parent, vit_encoder).eval()


# ------------------------------------------------------------------ case 10: the shared cfg
@needs_hooked_transformer
def test_model_cfg_builds_initialised_weights_as_the_parents_does(parent, child, gpt2_tokenizer, vit_encoder):
    assert parent.cfg.init_weights is True and child.cfg.init_weights is True
    torch.manual_seed(11)
    from_child = HookedTransformer(child.cfg)
    torch.manual_seed(11)
    from_parent = HookedTransformer(parent.cfg)
    a, b = from_child.state_dict(), from_parent.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_child.W_E.std() > 0.01 and from_child.W_in.std() > 0.01  # initialised, not torch.empty
    # an LM built without init keeps its own setting
    lm = _lm(gpt2_tokenizer, init_weights=False)
    assert HookedVisionPrefix(lm, vit_encoder).cfg.init_weights is False and lm.cfg.init_weights is False


# ------------------------------------------------------------------ case 11: the weights' layout
def _lm_params(model):
    return {n: p for n, p in model.named_parameters() if not n.startswith(("vision.", "projection."))}


@needs_hooked_transformer
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_weights_are_contiguous_and_equal_the_parents(arch, parent, tiny_llama, vit_encoder):
    lm = parent if arch == "gpt2" else tiny_llama[1]
    torch.manual_seed(3)
    model = HookedVisionPrefix(lm, vit_encoder).eval()
    ours, theirs = _lm_params(model), dict(lm.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p.is_contiguous(), name
        assert p.stride() == theirs[name].stride(), name
        assert torch.equal(p.view(-1), theirs[name].view(-1)), name
    assert torch.equal(model.W_U.view(-1), lm.W_U.view(-1))
    assert torch.equal(model.W_O.view(-1), lm.W_O.view(-1))
    assert all(v.is_contiguous() for v in model.state_dict().values())
    tokens = lm.to_tokens(["A picture of a dog", "Hello"])
    assert torch.equal(model(tokens), lm(tokens))  # same weights, same layout: the same numbers


# ------------------------------------------------------------------ case 12: generate's arguments
@needs_hooked_transformer
@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=np.int64(3), do_sample=False),
    dict(max_new_tokens=torch.tensor(3), do_sample=0),
    dict(max_new_tokens=3, do_sample=1, top_k=np.int32(5), temperature=np.float32(0.7)),
    dict(max_new_tokens=3, do_sample=True, freq_penalty=-0.5, top_p=np.float64(0.9)),
    dict(max_new_tokens=3, do_sample=np.bool_(True), stop_at_eos=0, use_past_kv_cache=np.int64(1)),
])
def test_generate_accepts_what_the_parent_accepts(parent, child, kwargs):
    torch.manual_seed(7)
    expected = parent.generate("A picture of", return_type="tokens", verbose=False, **kwargs)
    torch.manual_seed(7)
    got = child.generate("A picture of", return_type="tokens", verbose=0, **kwargs)
    assert torch.equal(got, expected)


@needs_hooked_transformer
def test_generate_with_images_takes_numpy_and_torch_integers(child, pixels):
    plain = child.generate("A picture of", 3, images=pixels[:2], do_sample=False, return_type="tokens",
                           verbose=False)
    for n in (np.int64(3), torch.tensor(3)):
        out = child.generate("A picture of", n, images=pixels[:2], do_sample=0, return_type="tokens",
                             verbose=np.bool_(False))
        assert torch.equal(out, plain)
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        child.generate("A picture of", np.float64(3.0), images=pixels[:2])
    with pytest.raises(ValueError, match="do_sample must be True or False"):
        child.generate("A picture of", 2, images=pixels[:2], do_sample=2)


def test_generation_options_are_checked_and_made_python_values():
    out = check_generation_options(dict(max_new_tokens=np.uint8(4), do_sample=np.int64(0), top_k=torch.tensor(2),
                                        top_p=np.float32(0.5), temperature=torch.tensor(0.0), freq_penalty=-2,
                                        return_type="tokens"))
    assert out == dict(max_new_tokens=4, do_sample=False, top_k=2, top_p=0.5, temperature=0.0, freq_penalty=-2,
                       return_type="tokens")
    assert type(out["max_new_tokens"]) is int and type(out["do_sample"]) is bool and type(out["top_p"]) is float
    for args, error, message in [
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int"),
        (dict(max_new_tokens=torch.tensor(2.0)), TypeError, "max_new_tokens must be an int"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
        (dict(max_new_tokens=np.int64(0)), ValueError, "max_new_tokens must be >= 1, got 0"),
        (dict(do_sample="yes"), TypeError, "do_sample must be True or False"),
        (dict(verbose=2), ValueError, "verbose must be True or False"),
        (dict(top_k=np.int64(0)), ValueError, "top_k must be >= 1"),
        (dict(top_p=np.float32(1.5)), ValueError, r"top_p must be a number in \(0, 1\]"),
        (dict(temperature=np.float64(-1)), ValueError, "temperature must be finite and >= 0"),
        (dict(freq_penalty=float("nan")), ValueError, "freq_penalty must be a finite number"),
        (dict(freq_penalty="high"), TypeError, "freq_penalty must be a number"),
    ]:
        with pytest.raises(error, match=message):
            check_generation_options(args)
    assert check_int(torch.tensor([7]), "k") == 7 and check_flag(torch.tensor(True), "f") is True
    assert check_number(torch.tensor(2), "x") == 2
    with pytest.raises(TypeError, match="k must be an int"):
        check_int(torch.tensor(True), "k")


# ------------------------------------------------------------------ case 13: the parent's state dict
@needs_hooked_transformer
def test_the_parents_state_dict_loads_strictly_into_the_lm(parent, vit_encoder, gpt2_tokenizer, pixels):
    torch.manual_seed(3)
    model = HookedVisionPrefix(parent, vit_encoder).eval()
    projection = {k: v.clone() for k, v in model.projection.state_dict().items()}
    other = _lm(gpt2_tokenizer, seed=1)
    with pytest.raises(RuntimeError, match=r"load_lm_state_dict"):
        model.load_state_dict(other.state_dict())  # strict, and no vision keys: named, nothing loaded
    assert torch.equal(model.W_E, parent.W_E)
    result = model.load_lm_state_dict(other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    tokens = other.to_tokens("A picture of a cat")
    assert torch.equal(model(tokens), other(tokens))
    assert all(torch.equal(v, projection[k]) for k, v in model.projection.state_dict().items())
    # and back: the LM's part is a HookedTransformer state dict
    back = HookedTransformer(model.cfg, tokenizer=gpt2_tokenizer).eval()
    back.load_state_dict(model.lm_state_dict(), strict=True)
    assert torch.equal(back(tokens), other(tokens))
    # a whole model's state dict still loads strictly as before
    model.load_state_dict(model.state_dict(), strict=True)
    # strict over the LM's keys
    partial = {k: v for k, v in other.state_dict().items() if k != "unembed.W_U"}
    with pytest.raises(RuntimeError, match="missing keys.*unembed.W_U"):
        model.load_lm_state_dict(partial)
    assert model.load_lm_state_dict(partial, strict=False).missing_keys == ["unembed.W_U"]
    with pytest.raises(ValueError, match="encoder/projection keys"):
        model.load_lm_state_dict(model.state_dict())


# ------------------------------------------------------------------ case 5: token ids outside the vocabulary
@needs_hooked_transformer
def test_token_ids_outside_the_vocabulary_are_refused(child, pixels):
    good = child.to_tokens("A picture of", image=True)
    for bad_id in (-1, child.cfg.d_vocab + 1, 10 ** 6):
        bad = good.clone()
        bad[0, -1] = bad_id
        with pytest.raises(ValueError, match=rf"token ids \[{bad_id}\] outside the vocabulary \[0, 50257\)"):
            child(bad, images=pixels[:1])
        with pytest.raises(ValueError, match=rf"\[{bad_id}\]"):
            child(bad[:, -3:])  # text alone: the parent would embed -1 as W_E's last row
    child(good, images=pixels[:1])  # the image-slot id itself is fine


def test_check_token_ids_names_the_bad_ids():
    check_token_ids(torch.tensor([[0, 50256, 50257]]), 50257, image_token_id=50257)
    with pytest.raises(ValueError, match=r"\[-3, -1, 50258\] outside the vocabulary \[0, 50257\) \(nor the "
                                         r"image-slot id 50257\)"):
        check_token_ids(torch.tensor([[-1, 5, 50258, -3, -1]]), 50257, image_token_id=50257)
    with pytest.raises(ValueError, match=r"\[50257\] outside"):
        check_token_ids(torch.tensor([50257]), 50257)
    with pytest.raises(ValueError, match=r"input_ids hold token ids \[95, 96, 97, 98, 99\] \(and 1 more\)"):
        check_token_ids(torch.arange(95, 101), 95, name="input_ids")
