"""A byte-level BPE tokenizer for the embedded default model, trained locally.

Nothing can be downloaded here, so the default model cannot use Qwen's 151k-token vocabulary. We train
a small byte-level BPE (any byte string stays encodable) on text shaped like what the model reads and
writes: prompts, the answer grammar, JSON boxes, category names. Qwen2.5-VL's special tokens and chat
template are added so that every code path (processor, vLLM, chat templating) treats the directory
exactly like a real Qwen2.5-VL checkpoint.
"""

from __future__ import annotations

import random

# Qwen2.5-VL's special tokens, in Qwen's order. The processor and vLLM look them up by text.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The answer grammar's tags. Qwen2's pre-tokenizer splits them ("<think", ">") before any merge, so they are
# made single tokens as added, non-special tokens (below). A real Qwen checkpoint has no such tokens: there a tag
# takes several tokens (the environment and the rewards read the text, not token ids).
GRAMMAR_TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<zoom>", "</zoom>", "<focus>", "</focus>")

# Qwen2's chat template (the same one Qwen2.5-VL ships): images become
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one pad per merged patch.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split: digits one by one (coordinates become digit sequences, which a small
# model learns far more easily than thousands of number tokens), words, punctuation runs, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = (
    "camouflaged animal object image is there a an the in this picture find locate where what which "
    "answer think look focus zoom refocus overview rethink backtracing summary region box boxes "
    "present category confidence none hidden blends background texture colour edge shape left right "
    "top bottom center small large pixel pixels coordinates frame original input normalised output "
    "format json true false null classify detect ground camo yes no step first then finally because "
    "moth fish frog leaf insect crab snake owl lizard spider butterfly stick batfish"
).split()


def training_corpus(*, seed: int = 0, n_lines: int = 4000) -> list[str]:
    """Lines shaped like prompts and completions, for the BPE trainer (deterministic per seed)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        box = [rng.randint(0, 999) for _ in range(4)]
        category = rng.choice(_WORDS[-13:])
        present = rng.random() < 0.8
        answer = (
            f'{{"present": true, "category": "{category}", "boxes": [[{box[0]}, {box[1]}, {box[2]}, {box[3]}]]}}'
            if present
            else '{"present": false, "category": null, "boxes": []}'
        )
        lines.append(
            f"<think>{words} <focus>[{box[0]},{box[1]},{box[2]},{box[3]}]</focus></think>"
            f"<answer>{answer}</answer>"
        )
        lines.append(f"<think>{words}</think><zoom>[{box[0]}, {box[1]}, {box[2]}, {box[3]}]</zoom>")
        lines.append(words.capitalize() + "? Answer with " + " ".join(GRAMMAR_TAGS) + ".")
    return lines


def train_tokenizer(*, vocab_size: int, seed: int = 0):
    """Train the byte-level BPE and wrap it as a transformers ``Qwen2TokenizerFast``-compatible tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(seed=seed), trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    # Non-special added tokens: each tag is one token, and decoding keeps it (special ones are dropped).
    hf.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in GRAMMAR_TAGS])
    hf.chat_template = CHAT_TEMPLATE
    return hf
