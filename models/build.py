"""Build the embedded default model: a Qwen2.5-VL-architecture checkpoint with random weights.

``build_model(size="tiny"|"small", out_dir=...)`` writes a directory that is laid out exactly like a
real Qwen2.5-VL checkpoint (config.json, model.safetensors, tokenizer files with the chat template,
preprocessor_config.json), so every consumer — transformers' Auto classes, vLLM, our learner — treats
it like one, and a real checkpoint directory is accepted wherever this one is.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.checkpoint import RESUMABLE_STATE
from models.records import AVERAGED_FROM_FILE, BUILD_INFO_FILE, WARM_START_FILE
from models.warmstart import WarmStartConfig

log = logging.getLogger(__name__)

# The model input is the image resized to a multiple of 28 px (patch 14 × merge 2); one 28×28 cell is
# one image token. Our synthetic images are 112 px, so the default pixel budget admits exactly that.
PATCH_SIZE = 14
MERGE_SIZE = 2


class ModelSizeSpec(BaseModel):
    """Dimensions of one default model size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(ge=512, description="BPE vocabulary incl. special tokens")
    hidden_size: int = Field(ge=32, description="language model width")
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=32)
    vision_hidden_size: int = Field(ge=32)
    vision_depth: int = Field(ge=1)
    vision_heads: int = Field(ge=1)
    vision_intermediate_size: int = Field(ge=32)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("head_dim must be a multiple of 4 (mrope_section splits head_dim/2 in 3)")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError("vision_hidden_size must divide by vision_heads")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def mrope_section(self) -> list[int]:
        """Split head_dim/2 rotary frequencies over (time, height, width); must sum to head_dim/2."""
        half = self.head_dim // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


SIZES: dict[str, ModelSizeSpec] = {
    # ≈1.4M parameters: for tests.
    "tiny": ModelSizeSpec(
        vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
        vision_hidden_size=128, vision_depth=2, vision_heads=4, vision_intermediate_size=256,
    ),
    # ≈12M parameters: for the CPU learning run.
    "small": ModelSizeSpec(
        vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024,
        vision_hidden_size=256, vision_depth=4, vision_heads=4, vision_intermediate_size=1024,
    ),
}


def qwen2_5_vl_config(spec: ModelSizeSpec, *, token_ids: dict[str, int]):
    """A transformers ``Qwen2_5_VLConfig`` for ``spec`` whose special-token ids match our tokenizer."""
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": spec.mrope_section()},
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
    )
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden_size,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        window_size=112,
        # Last block attends globally, the others in windows, as in the real model.
        fullatt_block_indexes=[spec.vision_depth - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def preprocessor_config(*, min_pixels: int, max_pixels: int) -> dict:
    """Qwen2.5-VL's image processor settings (CLIP normalisation), with our pixel budget."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": 2,
        "merge_size": MERGE_SIZE,
    }


class BuildRecipe(BaseModel):
    """What a builtin size is built with besides its dimensions: pixel budget and perception warm start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_pixels: int = Field(ge=28 * 28, description="processor's smallest image area (pixels)")
    max_pixels: int = Field(ge=28 * 28, description="processor's largest image area (pixels)")
    warm_start: WarmStartConfig | None = Field(None, description="dense pre-training of the vision tower; None: random")


RECIPES: dict[str, BuildRecipe] = {
    # Tests: any image from 56 to 224 px keeps its size; random weights.
    "tiny": BuildRecipe(min_pixels=56 * 56, max_pixels=224 * 224),
    # The learning run: every image is shown at 112x112 px, 4x4 = 16 image tokens. 224 px (64 tokens)
    # was measured too: 4x the vision compute per image (2.5 vs 0.62 s per warm-start step of 32 images),
    # so a 10-minute warm start saw a quarter of the images and had not begun to learn categories; SFT
    # steps cost 2.7x as much. The vision tower is warm-started so the language model has something to
    # read (ARCHITECTURE.md §9). The warm start teaches WHERE only (objectness and box edges): with the
    # category objective added the tower learnt neither (held-out objectness hit 0.11-0.18 against chance
    # 0.09 after 300 steps); without it, 0.63-0.66 after 200 steps. Staged (category_start_fraction 0.25,
    # weight 0.3, 900 steps) it did not learn categories either: held-out pooled category accuracy stayed at
    # 0.19-0.20 (chance 0.14) while the objectness hit fell from 0.50 to 0.27-0.44. Nor with half the animals
    # shown enlarged, as a zoom shows them (a crop of 1.2-2x the animal's side at 112 px: 4-8 patches across
    # it instead of 2-3; branch `crops`, 02a0fb4), staged the same way, 1500 steps: after 525 steps with the
    # category losses, held-out category accuracy 0.16-0.23 on such crops and 0.18-0.27 on whole images, and
    # the objectness hit fell from 0.50-0.57 to 0.42-0.52 (stopped at step 900). Yet this recipe's finished
    # tower, fine-tuned on tight centred crops (1.2x) with the category as its only objective, learns them:
    # 0.58 against 0.27 on whole images (bench.category_probe). Categories are left to SFT for now.
    # What more compute does (bench.warmstart_scale on an H100, images rendered by DataLoader workers; held-out
    # category from the tokens pooled over the animal's true cells, chance 0.14): at weight 1.0 from 10 % of the
    # steps the tower learnt no categories in 6,500 steps × 32 images at 112 px (0.14-0.24) and its objectness hit
    # fell from 0.65 to 0.12-0.29 once they joined; at weight 0.2 from 30 % it keeps the hit (0.63-0.69) and learns
    # them slowly: 0.25 / 0.30 / 0.41 at 400 / 1,400 / 3,400 steps after they joined (112 px, 7,000-step schedule);
    # at 224 px (64 tokens) 0.52 at step 2,750 of 3,000, hit 0.93. Those are 1-2 h builds on 2 CPU cores (0.62 s per
    # step at 112 px, 2.5 s at 224). Squeezed into this recipe's 1,500 CPU steps (905 s), the gentle objective gave
    # category 0.23 but hit 0.47 and presence AUC 0.74, against this recipe's 0.67 and 0.94: not adopted.
    # Where the boxes are, more compute does help: a box head trained on the tower's tokens alone (bench.box_probe,
    # 2,000 fresh images, every present held-out animal boxed) reads hard mIoU 0.513 from this recipe's tower,
    # 0.606 after 4,500 steps and 0.610 after 7,500 (H100, category weight 0); but 4,500 steps are 47 min here,
    # and on that tower RL still trailed the SFT control (README, "What any readout of the tower can reach").
    # 1500 steps (969 s against ~580 for 900) see better: tower presence probe 0.890 vs 0.863 ROC AUC on hard
    # images (bench.tower_probe), and after the same SFT hard presence 0.892 vs 0.832, hard mIoU 0.421 vs
    # 0.350; the fresh-machine main job stays under its 45 minutes (timed: 43.9). Rendering the images in a
    # DataLoader worker beside the training step gained nothing on 2 cores (0.63-0.65 vs 0.62-0.63 s per step):
    # the tower's step already keeps both busy.
    "small": BuildRecipe(min_pixels=112 * 112, max_pixels=112 * 112,
                         warm_start=WarmStartConfig(steps=1500, box_weight=1.0, category_weight=0.0)),
}



def build_info(*, size: str, seed: int, recipe: BuildRecipe) -> dict:
    return {"size": size, "seed": seed, "spec": SIZES[size].model_dump(), "recipe": recipe.model_dump(mode="json")}


def is_built_by(out_dir: str | Path, *, size: str, seed: int, recipe: BuildRecipe) -> bool:
    """Whether ``out_dir`` holds a finished build of ``size`` and ``seed`` by ``recipe``.

    The stored spec and recipe are validated before the comparison, so a field added to the recipe since
    (its default keeps the old behaviour, as every new field's must) reads as its default rather than as
    a change, and does not rebuild a model for nothing; any other difference, or an unreadable file, does.
    """
    info = Path(out_dir) / BUILD_INFO_FILE
    if not info.is_file():
        return False
    try:
        stored = json.loads(info.read_text())
        return (stored["size"] == size and stored["seed"] == seed
                and ModelSizeSpec.model_validate(stored["spec"]) == SIZES[size]
                and BuildRecipe.model_validate(stored["recipe"]) == recipe)
    except (KeyError, TypeError, ValueError):  # ValueError covers bad JSON and pydantic's ValidationError
        return False


def build_model(
    *,
    size: Literal["tiny", "small"] = "tiny",
    out_dir: str | Path,
    seed: int = 0,
    recipe: BuildRecipe | None = None,
    replace_any: bool = False,
) -> Path:
    """Write a Qwen2.5-VL checkpoint directory of the given size; returns its path.

    Weights are random except the vision tower when the recipe (default: ``RECIPES[size]``) has a
    warm start. The directory records its recipe in ``refocus_build.json``. An existing ``out_dir`` is
    replaced only if it records one too (a model built here), is empty, or ``replace_any`` (the builtin
    cache's own directories, whatever an older version left there).
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    spec = SIZES[size]
    recipe = recipe or RECIPES[size]
    out = Path(out_dir)
    # A rebuild replaces the directory whole: only one this function wrote (it records how), never the user's. A
    # checkpoint or an average made from a build may still carry its record (copied before models.records): refused.
    trained = [name for name in (*RESUMABLE_STATE, AVERAGED_FROM_FILE) if (out / name).exists()]
    if not replace_any and out.exists() and (trained or (not (out / BUILD_INFO_FILE).is_file()
                                                          and (not out.is_dir() or any(out.iterdir())))):
        what = f"a trained model or checkpoint (it holds {trained[0]})" if trained else \
            f"not a model built here (no {BUILD_INFO_FILE})"
        raise FileExistsError(f"--out: {out} exists and is {what}; a build replaces its directory whole, so give a "
                              "new or empty one")
    # Built in a side directory and renamed into place, so an interrupted build never looks complete.
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    from models.tokenizer import SPECIAL_TOKENS, train_tokenizer

    tokenizer = train_tokenizer(vocab_size=spec.vocab_size, seed=seed)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # The embedding table must cover every id the tokenizer can produce.
    spec = spec.model_copy(update={"vocab_size": max(spec.vocab_size, len(tokenizer))})

    torch.manual_seed(seed)
    config = qwen2_5_vl_config(spec, token_ids=token_ids)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = token_ids["<|endoftext|>"]
    processor_settings = preprocessor_config(min_pixels=recipe.min_pixels, max_pixels=recipe.max_pixels)
    if recipe.warm_start is not None:
        from transformers import AutoImageProcessor

        from models.warmstart import warm_start_vision

        (staging / "preprocessor_config.json").write_text(json.dumps(processor_settings))
        image_processor = AutoImageProcessor.from_pretrained(staging, backend="pil")
        result = warm_start_vision(model, image_processor=image_processor, config=recipe.warm_start)
        (staging / WARM_START_FILE).write_text(json.dumps(result, indent=2))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "preprocessor_config.json").write_text(json.dumps(processor_settings, indent=2))
    (staging / "chat_template.jinja").write_text(tokenizer.chat_template)
    (staging / BUILD_INFO_FILE).write_text(json.dumps(build_info(size=size, seed=seed, recipe=recipe), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built %s model (%.2fM parameters) in %s", size, n_params / 1e6, out)
    return out
