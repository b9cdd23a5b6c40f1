"""LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Gemma 3 and Idefics3 on TransformerLens's bridge (VLMBridge): tiny
random HF models built offline (tests/pretrained/vlm_tiny.py), each with its tiles / crops / dynamic resolution
active. Oracles: the HF model itself fed the processor's batch, finite differences, HF's own weights and MLP
inputs, and a hand-built model with a planted unit that fires only on one quadrant of the original image."""

import copy

import pytest
import torch

import tl_multimodal
from tl_multimodal import (ablate_vlm_units, attribute_vlm, chat_inputs, decode_units, greedy_answer, patch_vlm_units,
                           vlm_unit_activations, vlm_unit_heatmap)
from tl_multimodal.analysis.ablation import sample_matched_units
from tl_multimodal.analysis.nouns import first_noun
from tl_multimodal.models.vlm_geometry import image_token_geometry

from vlm_tiny import BUILDERS, TEMPLATE, build, lm_layers, make_pointwise, plain_image, plant_unit, quadrant_image

from conftest import HAS_HOOKED_TRANSFORMER

# TransformerLens 3.9's adapters run these two models' text exactly but not their image path (measured here:
# max |logit diff| vs HF 1.8e-4 for LLaVA-NeXT and 0.85 for Gemma 3, text-only input 0.0); 4.3's match HF.
TL3_IMAGE_PATH_OFF = {"llava_next": "1.8e-4", "gemma3": "0.85"}


def skip_if_adapter_differs(name):
    if HAS_HOOKED_TRANSFORMER and name in TL3_IMAGE_PATH_OFF:
        pytest.skip(f"TransformerLens 3.9's {name} adapter gives logits {TL3_IMAGE_PATH_OFF[name]} off HF's on "
                    "images (text-only input: equal); VLMs run on the 4.x bridge")


ARCHS = list(BUILDERS)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    """(tiny, model): the tiny HF model and a copy of it on the bridge."""
    skip_if_adapter_differs(request.param)
    tiny = build(request.param)
    model = tl_multimodal.load(copy.deepcopy(tiny.hf), processor=tiny.processor)
    return tiny, model


def test_logits_equal_hf_on_the_processors_batch(arch):
    tiny, model = arch
    assert isinstance(model, tl_multimodal.VLMBridge)
    batch = tiny.batch(tiny.random_image())
    with torch.no_grad():
        want = tiny.hf(**batch).logits
        got = model(**batch)
    diff = (got - want).abs().max().item()
    print(f"{tiny.name}: max |logit diff| vs HF {diff:.2e} (logit scale {want.abs().max():.2f})")
    assert got.shape == want.shape and diff < 1e-4
    other = tiny.batch(tiny.random_image(seed=1))
    with torch.no_grad():
        assert not torch.allclose(model(**other)[:, -1], got[:, -1], atol=1e-3)  # the image matters


def test_geometry_has_one_record_per_image_token_covering_the_image(arch):
    tiny, model = arch
    image = tiny.random_image()
    batch = tiny.batch(image)
    geometry = model.image_geometry([image.size], **tiny.processor_kwargs)
    assert len(geometry) == int(model.image_mask(batch["input_ids"]).sum())
    w, h = image.size
    box = geometry.box[geometry.is_patch]
    assert (box[:, 0] >= -1).all() and (box[:, 2] <= w + 1).all() and (box[:, 1] >= -1).all() and (box[:, 3] <= h + 1).all()
    assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
    assert torch.isfinite(geometry.paint(torch.ones(len(geometry)))).all()  # every pixel is seen by some token
    n_views = int(geometry.view.max()) + 1
    assert n_views > 1 or tiny.name == "qwen2_5_vl"  # tiles / crops active (Qwen: one dynamic-resolution view)
    if tiny.name in ("llava_next", "llava_onevision"):  # one image_newline per row of the unpadded tile grid
        assert (~geometry.is_patch).sum() > 0 and (geometry.view[~geometry.is_patch] == -1).all()


def test_attribution_equals_finite_differences(arch):
    tiny, model = arch
    batch = tiny.batch(tiny.random_image())
    target = int(model(**batch)[0, -1].argmax())
    attr = attribute_vlm(model, batch, target=target)
    n_layers, n_tok, d_mlp = attr.scores.shape
    assert (n_layers, n_tok, d_mlp) == (model.cfg.n_layers, int(model.image_mask(batch["input_ids"]).sum()), model.cfg.d_mlp)
    flat = attr.scores.abs().flatten().topk(3).indices
    eps = 1e-2
    for index in flat.tolist():
        layer, rest = divmod(index, n_tok * d_mlp)
        token, unit = divmod(rest, d_mlp)
        name = f"blocks.{layer}.mlp.hook_post"
        position = model.image_mask(batch["input_ids"])[0].nonzero()[token, 0]

        def logprob(delta):
            def add(act, hook):
                act = act.clone()
                act[0, position, unit] += delta
                return act

            with torch.no_grad():
                logits = model.run_with_hooks(**batch, fwd_hooks=[(name, add)])
            return logits[0, -1].double().log_softmax(-1)[target]

        with torch.no_grad():
            _, cache = model.run_with_cache(**batch, names_filter=name)
        act = cache[name][0, position, unit].double()
        fd = act * (logprob(eps) - logprob(-eps)) / (2 * eps)
        score = attr.scores[layer, token, unit].double()
        assert abs(score - fd) <= 2e-2 * abs(score) + 1e-4, (tiny.name, layer, token, unit, float(score), float(fd))


def test_ablating_top_units_lowers_p_more_than_random_units(arch):
    tiny, model = arch
    batch = tiny.batch(tiny.random_image())
    target = int(model(**batch)[0, -1].argmax())
    attr = attribute_vlm(model, batch, target=target)
    top = attr.top_units(8, over_patches="sum").units()  # first order: zeroing takes the sum
    ablated = ablate_vlm_units(model, batch, top, target)
    generator = torch.Generator().manual_seed(0)
    random = [ablate_vlm_units(model, batch, sample_matched_units(top, model.cfg.d_mlp, generator), target)
              for _ in range(5)]
    drop_top = float(ablated.p_before - ablated.p_after)
    drop_random = max(float(r.p_before - r.p_after) for r in random)
    print(f"{tiny.name}: p(c) {float(ablated.p_before):.4g}, top-8 drop {drop_top:.3g}, best of 5 random drops {drop_random:.3g}")
    assert drop_top > 0 and drop_top > drop_random


def test_patching_units_equals_hf_with_the_source_mlp_activations(arch):
    """Patch layer-0 units from a plain white image at the image tokens; the oracle patches HF's own
    down-projection input (act(gate) * up) captured from HF's run on the source image."""
    tiny, model = arch
    base, source = tiny.batch(tiny.random_image(0)), tiny.batch(plain_image(tiny.size, "white"))
    target = int(model(**base)[0, -1].argmax())
    units = torch.tensor([[0, u] for u in range(0, model.cfg.d_mlp, 2)])  # every other unit of layer 0
    got = patch_vlm_units(model, base, source, units, target)

    down = lm_layers(tiny.hf)[0].mlp.down_proj
    seen = {}
    handle = down.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    with torch.no_grad():
        tiny.hf(**source)
    handle.remove()
    src_mask, base_mask = (b["input_ids"] == model.image_token_id for b in (source, base))

    def patch(m, args):
        x = args[0].clone()
        rows = x[base_mask]
        rows[:, units[:, 1]] = seen["x"][src_mask][:, units[:, 1]]
        x[base_mask] = rows
        return (x,)

    handle = down.register_forward_pre_hook(patch)
    with torch.no_grad():
        want = tiny.hf(**base).logits[0, -1].softmax(-1)[target]
    handle.remove()
    log_patched, log_base = float(got.p_patched[0].log()), float(got.p_base[0].log())
    print(f"{tiny.name}: log p(c) base {log_base:.6f}, patched {log_patched:.6f}, HF patched {float(want.log()):.6f}")
    assert abs(log_patched - float(want.log())) < 1e-5  # float32 log-probabilities of ~-10
    assert abs(log_patched - log_base) > 1e-4  # the patch did something


def test_decoding_is_the_down_projection_row_through_the_unembedding(arch):
    tiny, model = arch
    dec = decode_units(model, [(0, 5), (1, 7)], n_tokens=5)
    for i, (layer, unit) in enumerate([(0, 5), (1, 7)]):
        down = lm_layers(tiny.hf)[layer].mlp.down_proj.weight[:, unit]
        want = (tiny.hf.lm_head.weight @ down).topk(5).indices
        assert dec.token_ids[i].tolist() == want.tolist()


@pytest.mark.parametrize("name", ARCHS)
def test_planted_quadrant_unit_gives_a_heatmap_in_that_quadrant(name):
    skip_if_adapter_differs(name)
    tiny = build(name)
    make_pointwise(tiny.hf)
    plant_unit(tiny, unit=0)
    model = tl_multimodal.load(tiny.hf, processor=tiny.processor)
    image = quadrant_image(tiny.size)
    batch = tiny.batch(image)
    acts = vlm_unit_activations(model, batch, 0, 0)
    heat = vlm_unit_heatmap(model, batch, 0, 0, [image.size], **tiny.processor_kwargs)
    w, h = image.size
    mass = heat.nan_to_num().clamp(min=0)
    inside = float(mass[: h // 2, : w // 2].sum() / mass.sum())
    geometry = model.image_geometry([image.size], **tiny.processor_kwargs)
    print(f"{name}: {len(acts)} image tokens in {int(geometry.view.max()) + 1} views; "
          f"heatmap mass in the white quadrant {inside:.3f}")
    assert acts.max() > 0 and (acts[geometry.is_patch] >= -1e-6).all()
    assert inside > 0.9


@pytest.fixture(scope="module")
def qwen():
    tiny = build("qwen2_5_vl")
    return tiny, tl_multimodal.load(copy.deepcopy(tiny.hf), processor=tiny.processor)


def test_default_target_is_the_first_noun_of_hfs_greedy_answer_to_the_chat_prompt(qwen):
    tiny, model = qwen
    image = tiny.random_image()
    processor = copy.copy(tiny.processor)
    processor.chat_template = TEMPLATE.replace("IMAGE", tiny.placeholder)
    model.__dict__["processor"] = processor
    try:
        batch = chat_inputs(model, [image])
    finally:
        model.__dict__["processor"] = tiny.processor
    prompt = processor.tokenizer.decode(batch["input_ids"][0])
    assert "What is in the image?" in prompt and prompt.endswith("ASSISTANT:")
    with torch.no_grad():
        hf_ids = tiny.hf.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)[0, batch["input_ids"].shape[1]:]
    assert greedy_answer(model, batch, 12).tolist() == hf_ids.tolist()
    answer = processor.tokenizer.decode(hf_ids)
    noun, offset = first_noun(answer)
    attr = attribute_vlm(model, batch)
    assert attr.answer == answer
    n_prefix = attr.inputs["input_ids"].shape[1] - batch["input_ids"].shape[1]
    assert attr.target_id == int(hf_ids[n_prefix])  # the answer's token at the noun, after the answer before it
    before = processor.tokenizer.decode(hf_ids[:n_prefix])
    assert len(before) <= offset < len(processor.tokenizer.decode(hf_ids[:n_prefix + 1]))
    print(f"answer {answer!r}: noun {noun!r}, target {attr.target!r}")


def test_bad_inputs_are_refused_by_name(qwen):
    tiny, model = qwen
    batch = tiny.batch(tiny.random_image())
    with pytest.raises(TypeError, match="inputs"):
        attribute_vlm(model, batch["input_ids"], target=5)
    with pytest.raises(ValueError, match="input_ids"):
        attribute_vlm(model, {**batch, "input_ids": batch["input_ids"].expand(2, -1)}, target=5)
    with pytest.raises(ValueError, match="no image token"):
        attribute_vlm(model, {"input_ids": torch.tensor([[1, 2, 3]])}, target=5)
    with pytest.raises(ValueError, match="target"):
        attribute_vlm(model, batch, target=" a whole sentence of tokens")
    with pytest.raises(ValueError, match="chat template"):
        chat_inputs(model, [tiny.random_image()])
    small = tiny.batch(plain_image((60, 60), "white"))
    with pytest.raises(ValueError, match="image tokens"):
        patch_vlm_units(model, batch, small, [(0, 1)], 5)
    with pytest.raises(ValueError, match="image_sizes"):
        vlm_unit_heatmap(model, batch, 0, 1, [(60, 60)])
    geometry = model.image_geometry([tiny.size])
    with pytest.raises(ValueError, match="values"):
        geometry.paint(torch.ones(len(geometry) + 1))
    with pytest.raises(ValueError, match="over_patches"):
        attribute_vlm(model, batch, target=5).top_units(3, over_patches="mean")
    with pytest.raises(ValueError, match="already a VLMBridge"):
        tl_multimodal.VLMBridge(model, tiny.processor)


def test_load_picks_the_bridge_for_these_models_and_names():
    from tl_multimodal.pretrained.load import spec_kind

    for name in ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                 "Qwen/Qwen2.5-VL-3B-Instruct", "google/gemma-3-4b-it", "HuggingFaceTB/SmolVLM-256M-Instruct"):
        assert spec_kind(name) == "vlm"
    assert spec_kind("llava-hf/llava-1.5-7b-hf") == "llava"  # LLaVA-1.5 keeps its converter
    tiny = build("qwen2_5_vl")
    with pytest.raises(ValueError, match="processor= or tokenizer="):
        tl_multimodal.load(tiny.hf)
    with pytest.raises((ValueError, ImportError), match="backend='bridge'"):  # (4.x: no hooked backend at all)
        tl_multimodal.load(tiny.hf, processor=tiny.processor, backend="hooked")


def test_separators_are_left_out_of_unit_statistics(arch):
    """LLaVA-NeXT / OneVision's image_newline tokens: a unit scoring highest at a separator is ranked by its
    patch tokens only (the scores planted by hand in the attribution's table)."""
    tiny, model = arch
    image = tiny.random_image()
    batch = tiny.batch(image)
    attr = attribute_vlm(model, batch, target=5, image_sizes=[image.size], **tiny.processor_kwargs)
    is_patch = model.image_geometry([image.size], **tiny.processor_kwargs).is_patch
    assert attr.is_patch.tolist() == is_patch.tolist()
    if is_patch.all():
        assert tiny.name not in ("llava_next", "llava_onevision")
        return
    separator = int((~is_patch).nonzero()[0, 0])
    attr.scores[1, separator, 7] = 1e3
    top = attr.top_units(5)
    assert top.score[0] < 1e3 and is_patch[top.patch].all()
    assert attr.unit_scores()[1, 7] == attr.scores[1, is_patch, 7].max()


@pytest.mark.parametrize("name", ["llava_next", "qwen2_5_vl"])
def test_geometry_boxes_equal_the_processors_arithmetic(name):
    """Hand arithmetic, independent of the coordinate image: LLaVA-NeXT's base view is the whole image squashed
    to 28 x 28 (4 x 4 patches of 7 px) ahead of the tiles; Qwen2.5-VL's token (r, c) is the 28 px cell (r, c)
    of the image resized to image_grid_thw * 14 px."""
    tiny = build(name)
    w, h = tiny.size
    geometry = image_token_geometry(tiny.hf, tiny.processor.image_processor, [tiny.size])
    if name == "llava_next":
        rows, cols, n = 4, 4, 16
        assert (geometry.view[:n] == 0).all() and (geometry.view[n:][geometry.is_patch[n:]] > 0).all()
    else:
        _, grid_h, grid_w = tiny.batch(tiny.random_image())["image_grid_thw"][0].tolist()
        rows, cols, n = grid_h // 2, grid_w // 2, len(geometry)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    want = torch.stack([c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows], -1).reshape(-1, 4)
    torch.testing.assert_close(geometry.box[:n], want.float(), atol=0.3, rtol=0)  # (resampling blurs edges)
