"""The embedded default model: architecture, tokenizer, processor, reload through the Auto classes."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.build import SIZES, ModelSizeSpec
from models.processor import ImageOnlyQwen2_5_VLProcessor, load_processor, torchvision_works
from models.tokenizer import GRAMMAR_TAGS, SPECIAL_TOKENS


def test_sizes_are_in_the_advertised_parameter_ranges():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from models.build import qwen2_5_vl_config

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    counts = {}
    for name, spec in SIZES.items():
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(spec, token_ids=ids))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert 1e6 <= counts["tiny"] <= 3e6, counts
    assert 10e6 <= counts["small"] <= 40e6, counts


@pytest.mark.parametrize("spec", list(SIZES.values()))
def test_mrope_section_sums_to_half_head_dim(spec):
    assert sum(spec.mrope_section()) == spec.head_dim // 2
    assert all(s > 0 for s in spec.mrope_section())


def test_size_spec_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="num_heads"):
        ModelSizeSpec(
            vocab_size=1024, hidden_size=100, num_layers=1, num_heads=3, num_kv_heads=1, intermediate_size=64,
            vision_hidden_size=64, vision_depth=1, vision_heads=2, vision_intermediate_size=64,
        )


def test_directory_is_laid_out_like_a_qwen2_5_vl_checkpoint(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (tiny_model_dir / name).is_file(), name
    assert not tiny_model_dir.with_name(tiny_model_dir.name + ".building").exists()


def test_tokenizer_round_trips_the_answer_grammar_with_single_token_tags(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = '<think>look <focus>[1,2,3,4]</focus></think><answer>{"present": true, "boxes": [[12, 34, 56, 78]]}</answer>'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for tag in GRAMMAR_TAGS:
        assert len(tok.encode(tag)) == 1, tag
    # Digits are split one by one (Qwen2's pre-tokenizer), so every coordinate is expressible.
    assert len(tok.encode("1234")) == 4
    for special in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) is not None


def test_processor_expands_one_image_token_per_merged_patch(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    if not torchvision_works():
        assert isinstance(processor, ImageOnlyQwen2_5_VLProcessor)
    image = Image.fromarray(np.zeros((112, 112, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    batch = processor(images=[image], text=[text], return_tensors="pt")
    # 112 px → 8×8 patches of 14 px → 2×2 merge → 16 image tokens.
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == pad_id).sum()) == 16
    with pytest.raises(ValueError, match="images only"):
        processor(text=[text], videos=[np.zeros((2, 112, 112, 3), dtype=np.uint8)])


def test_saved_directory_reloads_with_auto_classes_and_generates(tiny_model_dir):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    AutoTokenizer.from_pretrained(tiny_model_dir)
    AutoImageProcessor.from_pretrained(tiny_model_dir)
    processor = load_processor(tiny_model_dir)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(buf, "PNG")
    image = Image.open(buf)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find it."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(images=[image], text=[text], return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, temperature=1.0, max_new_tokens=8, num_return_sequences=4)
    assert out.shape[0] == 4 and out.shape[1] > batch["input_ids"].shape[1]


def _write_info(out_dir, info: dict) -> None:
    from models.build import BUILD_INFO_FILE

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info))


def test_is_built_by_reads_a_recipe_field_added_since_as_its_default(tmp_path):
    from models.build import RECIPES, build_info, is_built_by

    recipe = RECIPES["small"]
    info = build_info(size="small", seed=0, recipe=recipe)
    del info["recipe"]["warm_start"]["bf16"]  # written before the field existed: default False, as now
    _write_info(tmp_path / "old", info)
    assert is_built_by(tmp_path / "old", size="small", seed=0, recipe=recipe)
    assert not is_built_by(tmp_path / "old", size="small", seed=1, recipe=recipe)
    assert not is_built_by(tmp_path / "missing", size="small", seed=0, recipe=recipe)


def test_is_built_by_sees_a_changed_recipe_or_an_unreadable_record(tmp_path):
    from models.build import BUILD_INFO_FILE, RECIPES, build_info, is_built_by

    recipe = RECIPES["small"]
    longer_warm_start = recipe.warm_start.model_copy(update={"steps": recipe.warm_start.steps + 600})
    longer = recipe.model_copy(update={"warm_start": longer_warm_start})
    _write_info(tmp_path / "a", build_info(size="small", seed=0, recipe=longer))
    assert not is_built_by(tmp_path / "a", size="small", seed=0, recipe=recipe)
    assert is_built_by(tmp_path / "a", size="small", seed=0, recipe=longer)
    _write_info(tmp_path / "b", {})
    (tmp_path / "b" / BUILD_INFO_FILE).write_text("{not json")
    assert not is_built_by(tmp_path / "b", size="small", seed=0, recipe=recipe)
    _write_info(tmp_path / "c", {**build_info(size="small", seed=0, recipe=recipe), "recipe": {"min_pixels": "x"}})
    assert not is_built_by(tmp_path / "c", size="small", seed=0, recipe=recipe)
