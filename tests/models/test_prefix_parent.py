"""HookedVisionPrefix run without images against its parent, HookedTransformer, on the same weights.

The oracle is TransformerLens itself: every behaviour a subclass inherits (parameter counts, the
loss with either padding side, partial forward passes, generation, tokenization, cache keys,
logit attributions) must give what the parent gives."""

import contextlib
import inspect

import pytest
import torch
import transformers

from conftest import ASSETS, skip_module_without_hooked_transformer

skip_module_without_hooked_transformer("HookedVisionPrefix against its parent HookedTransformer: TransformerLens 3 "
                                       "only (TransformerLens 4 removed HookedTransformer)")

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from tl_multimodal import HookedVisionPrefix  # noqa: E402

PROMPTS = ["Hello world", "A much longer sentence about a small dog on a red sofa"]


@pytest.fixture(scope="module")
def llama_pair(vit_encoder):
    """A tiny Llama-style LM whose tokenizer pads on the left, and HookedVisionPrefix built on it."""
    tok = transformers.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer", padding_side="left")
    torch.manual_seed(6)
    cfg = HookedTransformerConfig(
        d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=48, n_layers=2, n_ctx=128, d_vocab=50257,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
        gated_mlp=True, final_rms=True, model_name="tiny-llama-left", original_architecture="LlamaForCausalLM",
        default_prepend_bos=False)
    lm = HookedTransformer(cfg, tokenizer=tok, default_padding_side="left").eval()
    return lm, HookedVisionPrefix(lm, vit_encoder).eval()


@pytest.fixture(scope="module", params=["gpt2_small", "llama_left"])
def pair(request, gpt2_small, vlm, llama_pair):
    """(parent, child) on the same weights: GPT-2 small padding right, tiny Llama padding left."""
    return (gpt2_small, vlm) if request.param == "gpt2_small" else llama_pair


@contextlib.contextmanager
def _padding(models, side):
    before = [m.tokenizer.padding_side for m in models]
    for m in models:
        m.tokenizer.padding_side = side
    try:
        yield
    finally:
        for m, b in zip(models, before):
            m.tokenizer.padding_side = b


def test_llama_pair_pads_on_the_left_like_its_parent(llama_pair):
    lm, child = llama_pair
    assert lm.tokenizer.padding_side == child.tokenizer.padding_side == "left"


def test_n_params_total_counts_the_language_model_only(pair):
    lm, child = pair
    assert child.n_params_total == lm.n_params_total == sum(p.numel() for p in lm.parameters())
    assert child.n_params_vision == sum(p.numel() for p in child.vision.parameters()) > 0
    assert child.n_params_projection == child.projection.linear.weight.numel() + child.projection.linear.bias.numel()
    assert child.n_params_total + child.n_params_vision + child.n_params_projection == sum(
        p.numel() for p in child.parameters())


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_with_padding_equals_the_parents(pair, side):
    lm, child = pair
    with _padding([lm, child], side):
        tokens = lm.to_tokens(PROMPTS)
        assert (tokens == lm.tokenizer.pad_token_id).any()  # the short prompt is padded
        for per_token in (False, True):
            expected = lm(tokens, return_type="loss", loss_per_token=per_token)
            torch.testing.assert_close(child(tokens, return_type="loss", loss_per_token=per_token), expected)
            torch.testing.assert_close(child(PROMPTS, return_type="loss", loss_per_token=per_token),
                                       lm(PROMPTS, return_type="loss", loss_per_token=per_token))
        logits = lm(tokens)
        mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
        toy = tokens[:, :4]
        torch.testing.assert_close(child.loss_fn(logits[:, :4], toy, mask), lm.loss_fn(logits[:, :4], toy, mask))


@torch.no_grad()
def test_positional_arguments_and_partial_passes_equal_the_parents(pair):
    lm, child = pair
    tokens = lm.to_tokens(PROMPTS[1])
    torch.testing.assert_close(child(tokens, "loss", True), lm(tokens, "loss", True))
    resid = lm(tokens, stop_at_layer=1)
    torch.testing.assert_close(child(tokens, stop_at_layer=1), resid)
    torch.testing.assert_close(child(resid, start_at_layer=1), lm(resid, start_at_layer=1))
    torch.testing.assert_close(child(resid, start_at_layer=1, stop_at_layer=-1),
                               lm(resid, start_at_layer=1, stop_at_layer=-1))


@torch.no_grad()
def test_positional_arguments_are_named_with_images(vlm, pixels):
    by_name = vlm("A picture of", images=pixels[:1], return_type="loss", loss_per_token=True)
    torch.testing.assert_close(vlm("A picture of", "loss", True, images=pixels[:1]), by_name)
    with_bos = vlm("A picture of", "logits", False, True, images=pixels[:1])  # prepend_bos=True, positionally
    assert with_bos.shape[1] == by_name.shape[1] + 2  # one more position than the loss has, for the BOS
    bos_tokens = vlm.to_tokens("A picture of", True, image=True)
    assert bos_tokens[0, 0] == vlm.tokenizer.bos_token_id  # [BOS][image][text]
    assert vlm.image_mask(bos_tokens)[0].tolist() == [False] + [True] * vlm.n_image_tokens + [False] * 3
    torch.testing.assert_close(with_bos, vlm(bos_tokens, images=pixels[:1]))
    with pytest.raises(TypeError):
        vlm("A picture of", images=pixels[:1], not_an_argument=1)


@torch.no_grad()
def test_generate_equals_the_parents(pair):
    lm, child = pair
    kwargs = dict(do_sample=False, verbose=False, stop_at_eos=False)
    assert child.generate("Hello world", 5, **kwargs) == lm.generate("Hello world", 5, **kwargs)
    tokens = lm.to_tokens(PROMPTS)
    for cache in (True, False):
        torch.testing.assert_close(child.generate(tokens, 4, use_past_kv_cache=cache, **kwargs),
                                   lm.generate(tokens, 4, use_past_kv_cache=cache, **kwargs))


def test_tokenization_methods_equal_the_parents(pair):
    lm, child = pair
    for side in ("left", "right"):
        torch.testing.assert_close(child.to_tokens(PROMPTS, padding_side=side), lm.to_tokens(PROMPTS, padding_side=side))
    assert torch.equal(child.to_tokens("Hello", prepend_bos=True), lm.to_tokens("Hello", prepend_bos=True))
    ids = lm.to_tokens(PROMPTS[1])
    for x in ("Hello world", PROMPTS, ids, ids[0], ids[0, :1], ids[0, 1], ids[0].numpy(), ids.numpy(), [ids[0], ids[0]]):
        assert child.to_str_tokens(x) == lm.to_str_tokens(x)
    assert child.to_str_tokens("Hello", prepend_bos=False) == lm.to_str_tokens("Hello", prepend_bos=False)
    for x in (ids, ids[0], ids[0].tolist(), ids[0].numpy(), torch.tensor(464)):
        assert child.to_string(x) == lm.to_string(x)
    assert child.to_single_token(" dog") == lm.to_single_token(" dog")
    assert child.to_single_str_token(3290) == lm.to_single_str_token(3290)
    for mode in ("first", "last"):
        assert child.get_token_position(" a", PROMPTS[1], mode=mode) == lm.get_token_position(" a", PROMPTS[1], mode=mode)
        assert child.get_token_position(" a", ids, mode=mode) == lm.get_token_position(" a", ids, mode=mode)


def test_token_methods_read_image_slots(vlm, gpt2_small):
    tokens = vlm.to_tokens(["A picture of", "A dog"], image=True)  # [2, pos], right-padded
    n = vlm.n_image_tokens
    slots = [f"<image_{i}>" for i in range(n)]
    batched = vlm.to_str_tokens(tokens)
    assert len(batched) == 2
    for row, str_row in zip(tokens, batched):
        assert str_row == slots + gpt2_small.to_str_tokens(row[n:])
    assert vlm.to_str_tokens(tokens[:1]) == vlm.to_str_tokens(tokens[0]) == batched[0]
    assert vlm.to_str_tokens(tokens[0].numpy()) == batched[0]
    assert vlm.to_str_tokens(tokens[0, :1]) == ["<image_0>"]
    assert vlm.to_string(tokens) == gpt2_small.to_string(tokens[:, n:])
    assert vlm.to_string(tokens[0]) == gpt2_small.to_string(tokens[0, n:])


@torch.no_grad()
def test_run_with_cache_keys_and_values_equal_the_parents(pair):
    lm, child = pair
    tokens = lm.to_tokens(PROMPTS)
    logits, cache = child.run_with_cache(tokens)
    expected_logits, expected = lm.run_with_cache(tokens)
    assert list(cache.keys()) == list(expected.keys())
    assert torch.equal(logits, expected_logits)  # bit for bit: the weight layout changes no result
    for name in expected.keys():
        torch.testing.assert_close(cache[name], expected[name])


@torch.no_grad()
def test_logit_attrs_equal_the_parents_and_name_image_slots(gpt2_small, vlm, pixels):
    tokens = gpt2_small.to_tokens(PROMPTS[1])
    logits, cache = vlm.run_with_cache(tokens)
    _, expected = gpt2_small.run_with_cache(tokens)
    answers = logits.argmax(-1)  # [1, pos]: one answer token per position
    torch.testing.assert_close(cache.logit_attrs(cache.accumulated_resid(), tokens=answers),
                               expected.logit_attrs(expected.accumulated_resid(), tokens=answers))
    image_tokens = vlm.to_tokens("A picture of", image=True)
    logits, cache = vlm.run_with_cache(image_tokens, images=pixels[:1])
    stack = cache.accumulated_resid()
    with pytest.raises(ValueError, match="image slots .* no unembedding direction; pass text token ids"):
        cache.logit_attrs(stack, tokens=image_tokens)
    with pytest.raises(ValueError, match="image slots"):
        vlm.tokens_to_residual_directions(vlm.image_token_id)
    answers = logits.argmax(-1)  # text ids at every position, image positions included
    scaled = cache.apply_ln_to_stack(stack, layer=-1)
    by_hand = torch.einsum("lbpd,dbp->lbp", scaled, vlm.W_U[:, answers])  # the definition: resid . W_U[:, answer]
    torch.testing.assert_close(cache.logit_attrs(stack, tokens=answers), by_hand)


def test_from_pretrained_takes_the_parents_positional_arguments():
    parent = list(inspect.signature(HookedTransformer.from_pretrained).parameters.values())
    child = inspect.signature(HookedVisionPrefix.from_pretrained).parameters
    assert list(child)[0] == parent[0].name == "model_name"
    assert child["lm_args"].kind is inspect.Parameter.VAR_POSITIONAL
    assert child["encoder"].kind is child["projection"].kind is inspect.Parameter.KEYWORD_ONLY
