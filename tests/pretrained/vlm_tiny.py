"""Tiny random HF VLMs built offline (LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Gemma 3, Idefics3), each with
its HF processor on GPT-2's tokenizer, an image size that makes its tiles / crops / dynamic resolution
active, and a way to plant a unit that fires only on image tokens of one colour."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import transformers as T
from PIL import Image

from conftest import ASSETS

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            max_position_embeddings=2048)
CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 84]]
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}ASSISTANT:")


@dataclass
class Tiny:
    """A tiny VLM: the HF model, its processor, the image placeholder text and an image size (w, h)."""

    name: str
    hf: object
    processor: object
    placeholder: str
    size: tuple[int, int]
    processor_kwargs: dict = field(default_factory=dict)

    def batch(self, image, text="Hi IMAGE What is it?"):
        prompt = text.replace("IMAGE", self.placeholder)
        return dict(self.processor(text=[prompt], images=[image], return_tensors="pt", **self.processor_kwargs))

    def random_image(self, seed=0):
        w, h = self.size
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _tokenizer(extra, **special):
    tok = T.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer", extra_special_tokens=special or None)
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def _widen(model):
    """Widen the random init so the tiny model is not almost linear (as tests/pretrained/test_llava.py does)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith(("mlp.down_proj.weight", "v_proj.weight")):
                p.mul_(4.0)
    return model.eval()


def llava_next():
    tok = _tokenizer(["<image>"])
    cfg = T.LlavaNextConfig(vision_config=T.CLIPVisionConfig(image_size=28, patch_size=7, **CLIP),
                            text_config=T.MistralConfig(vocab_size=len(tok), **TEXT), image_grid_pinpoints=PINPOINTS,
                            image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    ip = T.LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                   image_grid_pinpoints=PINPOINTS)
    proc = T.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=7, image_token="<image>",
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return Tiny("llava_next", _widen(T.LlavaNextForConditionalGeneration(cfg)), proc, "<image>", (80, 60))


def llava_onevision():
    tok = _tokenizer(["<image>", "<video>"])
    cfg = T.LlavaOnevisionConfig(vision_config=T.SiglipVisionConfig(image_size=28, patch_size=7, **CLIP),
                                 text_config=T.Qwen2Config(vocab_size=len(tok), **TEXT), image_grid_pinpoints=PINPOINTS,
                                 image_token_index=tok.convert_tokens_to_ids("<image>"),
                                 video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1)
    ip = T.LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)
    proc = T.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=T.LlavaOnevisionVideoProcessor(),
                                     num_image_tokens=16, vision_feature_select_strategy="full", image_token="<image>",
                                     video_token="<video>", vision_aspect_ratio="anyres_max_9")
    return Tiny("llava_onevision", _widen(T.LlavaOnevisionForConditionalGeneration(cfg)), proc, "<image>", (80, 60))


def qwen2_5_vl():
    tok = _tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]}
    cfg = T.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **TEXT),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    ip = T.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)
    proc = T.Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=T.Qwen2VLVideoProcessor())
    return Tiny("qwen2_5_vl", _widen(T.Qwen2_5_VLForConditionalGeneration(cfg)), proc,
                "<|vision_start|><|image_pad|><|vision_end|>", (200, 150))


def gemma3():
    tok = _tokenizer([], boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    cfg = T.Gemma3Config(
        vision_config=T.SiglipVisionConfig(image_size=56, patch_size=7, **CLIP),
        text_config=T.Gemma3TextConfig(vocab_size=len(tok), head_dim=16, sliding_window=64, **TEXT),
        mm_tokens_per_image=16, image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"), eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"))
    ip = T.Gemma3ImageProcessor(size={"height": 56, "width": 56}, pan_and_scan_min_crop_size=20,
                                pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
    proc = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=16)
    model = T.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # HF initialises the image projection to zeros: images would not matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    return Tiny("gemma3", _widen(model), proc, "<start_of_image>", (160, 60),
                {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20})  # the processor's defaults: off, 256


def idefics3():
    tok = _tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"])
    cfg = T.Idefics3Config(
        vision_config=dict(image_size=56, patch_size=7, **CLIP), scale_factor=2,
        text_config=dict(model_type="llama", vocab_size=len(tok), **TEXT), image_token_id=tok.convert_tokens_to_ids("<image>"))
    ip = T.Idefics3ImageProcessor(size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, do_image_splitting=True)
    proc = T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=16)
    return Tiny("idefics3", _widen(T.Idefics3ForConditionalGeneration(cfg)), proc, "<image>", (120, 90))


BUILDERS = {"llava_next": llava_next, "llava_onevision": llava_onevision, "qwen2_5_vl": qwen2_5_vl, "gemma3": gemma3,
            "idefics3": idefics3}


def build(name: str, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    tiny = BUILDERS[name]()
    tiny.hf.set_attn_implementation("eager")  # as the bridge runs it
    return tiny


def make_pointwise(hf) -> None:
    """Make every image token depend on its own pixels alone, and the LM's layer 0 MLP read the image
    tokens as they are: the vision tower's position embeddings and attention outputs, and the LM's layer-0
    attention output, are zeroed (a hand-built model for planted units)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            vision = "language_model" not in name and "lm_head" not in name
            if vision and ("position_embedding" in name or "self_attn.out_proj." in name or ".attn.proj." in name):
                p.zero_()
            if "language_model.layers.0.self_attn.o_proj." in name:
                p.zero_()


def plain_image(size, colour) -> Image.Image:
    return Image.new("RGB", size, colour)


def quadrant_image(size) -> Image.Image:
    """Black, with the top-left quadrant white."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[: h // 2, : w // 2] = 255
    return Image.fromarray(pixels)


def plant_unit(tiny, unit: int = 0, gain: float = 8.0) -> None:
    """Make the HF model's layer-0 MLP unit ``unit`` fire on white image tokens and be exactly 0 on black
    ones (its up row orthogonal to the black tokens' MLP input, its gate row along the white's rest);
    after :func:`make_pointwise`, where every image token's MLP input depends on its own pixels alone."""
    mlp = lm_layers(tiny.hf)[0].mlp

    def mlp_in(colour):
        batch = tiny.batch(plain_image(tiny.size, colour))
        seen = {}
        handle = mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
        tiny.hf(**batch)
        handle.remove()
        rows = seen["x"][batch["input_ids"] == tiny.hf.config_image_token_id]
        return rows[0]  # the first image token sees the image's top-left corner (newlines and padding differ)

    with torch.no_grad():
        tiny.hf.config_image_token_id = image_token_id(tiny.hf.config)
        white, black = mlp_in("white"), mlp_in("black")
        v = white - (white @ black) / (black @ black) * black
        v = v / v.norm()
        mlp.up_proj.weight[unit] = v
        mlp.gate_proj.weight[unit] = gain * v


def image_token_id(config) -> int:
    token = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if token is None else token


def lm_layers(hf):
    """The HF model's language-model decoder layers (Idefics3 calls its LM ``text_model``)."""
    inner = hf.model
    return (inner.text_model if hasattr(inner, "text_model") else inner.language_model).layers
