"""A tiny LLaVA without a tokenizer (token-ids mode) and ``<image>`` as a target: HF's own
``LlavaForConditionalGeneration`` is the oracle for what runs; what cannot run fails with a clear error."""

import copy

import pytest
import torch

import tl_multimodal
from tl_multimodal.analysis.probe import make_probe, target_id
from tl_multimodal.pretrained.llava import from_llava, llava_bridge

from conftest import needs_hooked_prefix
from test_llava import CHAT, IMAGE_TOKEN, _prompt, hf_llava, llava, processor  # noqa: F401 (fixtures)


@needs_hooked_prefix
@pytest.mark.parametrize("how", ["from_llava", "load"])
@torch.no_grad()
def test_token_ids_mode_runs_forward_and_generate_as_hf(hf_llava, how):
    model = from_llava(hf_llava) if how == "from_llava" else tl_multimodal.load(hf_llava, backend="hooked")
    assert model.tokenizer is None
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    ids = _prompt().expand(2, -1)
    want = hf_llava(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(model(ids, images=pixels), want, atol=1e-4, rtol=1e-4)  # float32, as test_llava

    want = hf_llava.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    got = model.generate(ids, 5, images=pixels, do_sample=False, stop_at_eos=False, verbose=False)
    assert got.tolist() == want.tolist()  # token input gives tokens back ("input", as TransformerLens)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: act)]):  # TransformerLens's loop
        assert model.generate(ids, 5, images=pixels, do_sample=False, stop_at_eos=False, verbose=False,
                              return_type="tokens").tolist() == want.tolist()


@needs_hooked_prefix
def test_token_ids_mode_refuses_text_methods_by_name(hf_llava):
    model = from_llava(hf_llava)
    pixels = torch.randn(1, 3, 32, 32)
    calls = [("to_str_tokens", lambda: model.to_str_tokens(_prompt())),
             ("to_tokens", lambda: model.to_tokens("USER: <image>\nhi", image=True)),
             ("to_string", lambda: model.to_string(_prompt())),
             ("generate\\(return_type='str'\\)", lambda: model.generate(_prompt(), 2, images=pixels, verbose=False,
                                                                        stop_at_eos=False, return_type="str")),
             ("to_tokens", lambda: model(CHAT, images=pixels))]
    for name, call in calls:
        with pytest.raises(ValueError, match=f"^{name} needs a tokenizer"):
            call()
    with pytest.raises(ValueError, match="to_tokens needs a tokenizer"):
        model.caption(pixels)


@pytest.mark.parametrize("how", ["llava_bridge", "load"])
def test_the_bridge_without_a_tokenizer_is_refused_before_the_hub(hf_llava, how, monkeypatch):
    import huggingface_hub
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("went to the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    hf = copy.deepcopy(hf_llava)
    with pytest.raises(ValueError, match=r"needs its tokenizer \(tokenizer=\.\.\.\)"):
        llava_bridge(hf) if how == "llava_bridge" else tl_multimodal.load(hf, backend="bridge")


@pytest.mark.parametrize("target", ["<image>", IMAGE_TOKEN, torch.tensor(IMAGE_TOKEN), "dog<image>"])
def test_the_image_token_is_not_a_target(llava, processor, target):  # noqa: F811
    model = llava
    with pytest.raises(ValueError, match=f"holds the image token \\(id {IMAGE_TOKEN}\\)"):
        target_id(model, target, "USER: <image>\nA picture of", multi_token="first")
    with pytest.raises(ValueError, match="^target .*holds the image token"):
        make_probe(model, 1, target=target, prompt=CHAT, multi_token="first")
    with pytest.raises(ValueError, match="^caption .*holds the image token"):
        make_probe(model, 1, captions="a dog <image> on grass", prompt=CHAT)
    assert target_id(model, "dog", CHAT) == processor.tokenizer(" dog", add_special_tokens=False)["input_ids"][0]
