"""Image tokens of a 640 x 480 photo in the hub VLMs of docs/vlms.md, offline: each model's HF processor class
built from the image-processing numbers of its hub config (written out below, as published in the model
repositories' preprocessor_config.json / processor_config.json / config.json), with GPT-2's tokenizer standing
in for the model's (only the image placeholder's expansion is counted), run on a 640 x 480 image. The
geometry column is this package's image_token_geometry on the same processor (views; separator tokens).

    python scripts/vlm_token_counts.py
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as T  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_multimodal.models.vlm_geometry import image_token_geometry  # noqa: E402

SIZE = (640, 480)
IMAGE_TOKEN = {"<image>": "<image>", "<|vision_start|><|image_pad|><|vision_end|>": "<|image_pad|>",
               "<start_of_image>": "<image_soft_token>"}  # the placeholder in the prompt -> the token it expands to


def tokenizer(extra, **special):
    tok = T.GPT2TokenizerFast.from_pretrained(ROOT / "tests/assets/gpt2_tokenizer", extra_special_tokens=special or None)
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def llava_next():
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    ip = T.LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                   image_grid_pinpoints=pinpoints)
    proc = T.LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer(["<image>"]), patch_size=14,
                                vision_feature_select_strategy="default", image_token="<image>",
                                num_additional_image_tokens=1)
    config = T.LlavaNextConfig(vision_config=T.CLIPVisionConfig(image_size=336, patch_size=14, num_hidden_layers=1),
                               text_config=T.MistralConfig(num_hidden_layers=1), image_grid_pinpoints=pinpoints)
    return "llava-hf/llava-v1.6-mistral-7b-hf", proc, "<image>", config, T.LlavaNextForConditionalGeneration, {}


def llava_onevision():
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    ip = T.LlavaOnevisionImageProcessor(size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints)
    proc = T.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tokenizer(["<image>", "<video>"]),
                                     video_processor=T.LlavaOnevisionVideoProcessor(), num_image_tokens=729,
                                     vision_feature_select_strategy="full", image_token="<image>", video_token="<video>",
                                     vision_aspect_ratio="anyres_max_9")
    config = T.LlavaOnevisionConfig(vision_config=T.SiglipVisionConfig(image_size=384, patch_size=14, num_hidden_layers=1),
                                    text_config=T.Qwen2Config(num_hidden_layers=1), image_grid_pinpoints=pinpoints,
                                    vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full")
    return ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", proc, "<image>", config,
            T.LlavaOnevisionForConditionalGeneration, {})


def qwen2_5_vl():
    ip = T.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = T.Qwen2_5_VLProcessor(image_processor=ip, video_processor=T.Qwen2VLVideoProcessor(),
                                 tokenizer=tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    config = T.Qwen2_5_VLConfig(vision_config=dict(depth=1, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                                text_config=dict(num_hidden_layers=1))
    return ("Qwen/Qwen2.5-VL-3B-Instruct", proc, "<|vision_start|><|image_pad|><|vision_end|>", config,
            T.Qwen2_5_VLForConditionalGeneration, {})


def gemma3(pan_and_scan=False):
    ip = T.Gemma3ImageProcessor(size={"height": 896, "width": 896})
    tok = tokenizer([], boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    proc = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=256)
    config = T.Gemma3Config(vision_config=T.SiglipVisionConfig(image_size=896, patch_size=14, num_hidden_layers=1),
                            text_config=T.Gemma3TextConfig(num_hidden_layers=1), mm_tokens_per_image=256)
    kwargs = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
              "pan_and_scan_min_ratio_to_activate": 1.2} if pan_and_scan else {}  # Gemma3Processor's defaults
    name = "google/gemma-3-4b-it" + (" (do_pan_and_scan=True)" if pan_and_scan else "")
    return name, proc, "<start_of_image>", config, T.Gemma3ForConditionalGeneration, kwargs


def smolvlm():
    ip = T.Idefics3ImageProcessor(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    proc = T.Idefics3Processor(image_processor=ip, image_seq_len=64,
                               tokenizer=tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]))
    config = T.Idefics3Config(vision_config=dict(image_size=512, patch_size=16, num_hidden_layers=1), scale_factor=4,
                              text_config=dict(model_type="llama", num_hidden_layers=1))
    return "HuggingFaceTB/SmolVLM-256M-Instruct", proc, "<image>", config, T.Idefics3ForConditionalGeneration, {}


def main():
    image = Image.new("RGB", SIZE, "gray")
    print(f"| hub model | image tokens for a {SIZE[0]} x {SIZE[1]} photo | views (geometry) | separators |")
    print("|---|---|---|---|")
    for build in (llava_next, llava_onevision, qwen2_5_vl, gemma3, lambda: gemma3(True), smolvlm):
        name, proc, placeholder, config, cls, kwargs = build()
        batch = proc(text=[f"Hi {placeholder} what?"], images=[image], return_tensors="pt", **kwargs)
        image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[placeholder])
        n_tokens = int((batch["input_ids"] == image_id).sum())
        with torch.device("meta"):  # no weights: the geometry reads the config and pure rearrangement code
            model = cls(config)
        geometry = image_token_geometry(model, proc.image_processor, [SIZE], **kwargs)
        assert len(geometry) == n_tokens, (name, len(geometry), n_tokens)
        print(f"| {name} | {n_tokens} | {int(geometry.view.max()) + 1} | {int((~geometry.is_patch).sum())} |")


if __name__ == "__main__":
    main()
