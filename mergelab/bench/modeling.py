"""A tiny but real Qwen2-VL for the offline benchmark: tokenizer, model config, processor and chat template.

The benchmark's models are genuine ``transformers.Qwen2VLForConditionalGeneration`` checkpoints (Qwen2-VL, Wang et
al. 2024, arXiv:2409.12191), only small: the merge policy preset ``qwen2_vl``, the evaluators and the loading code in
:mod:`mergelab.hf` treat them exactly like the 7B model the OptMerge paper (arXiv:2505.19892, section 4.2) merges.

* The tokenizer is a byte-level BPE trained locally on the task corpus (questions, answers and the chat template's
  fixed text), with Qwen2's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>`` ...). Its EOS is
  ``<|im_end|>`` as in Qwen2-VL-Instruct, so a generated answer ends where the chat turn ends.
* The processor is ``Qwen2VLProcessor`` with the PIL image processor; transformers 5 cannot build the video processor
  without torchvision, hence the :func:`mergelab.hf.no_video` subclass.
* The chat template is Qwen2-VL-Instruct's own, so a prompt is built as for the real model::

      messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
      prompt = processor.apply_chat_template(messages, add_generation_prompt=True)

  and training appends ``answer + eos`` (:func:`training_ids`).

Images are 112x112: 8x8 patches of 14 pixels, merged 2x2 into 16 image tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from PIL import Image

from mergelab.hf import no_video

IMAGE_SIZE = 112
"""Side of the benchmark's square images, in pixels (8x8 patches of 14 -> 16 merged image tokens)."""

QWEN2_VL_CHAT_TEMPLATE = (
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
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL-Instruct's chat template (``chat_template.json`` of Qwen/Qwen2-VL-7B-Instruct), verbatim."""

SPECIAL_TOKENS: tuple[str, ...] = (
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
"""Qwen2-VL's added special tokens, in Qwen2-VL's order; ``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn."""

_TEMPLATE_TEXT = ("system\nYou are a helpful assistant.", "user\n", "assistant\n")


@dataclass(frozen=True)
class TinyQwen2VLConfig:
    """Size of the benchmark's Qwen2-VL (the pilot's 0.9M-parameter size by default).

    Attributes:
        hidden_size: width of the language model (the vision merger projects to it).
        num_layers: language-model decoder layers.
        num_heads: attention heads of the language model (head dim = hidden_size / num_heads).
        num_kv_heads: key/value heads (grouped-query attention as in Qwen2).
        intermediate_size: MLP width of the language model.
        vision_embed_dim: width of the vision transformer.
        vision_depth: vision transformer blocks.
        vision_heads: vision attention heads.
        vocab_size: BPE vocabulary trained on the corpus (special tokens included).
        max_position_embeddings: longest sequence the rotary tables cover.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vision_embed_dim: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vocab_size: int = 640
    max_position_embeddings: int = 512

    @classmethod
    def tiny(cls) -> TinyQwen2VLConfig:
        """A smaller-still size for unit tests (builds and trains in seconds)."""
        return cls(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                   vision_embed_dim=32, vision_depth=1, vision_heads=2, vocab_size=400)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def corpus_lines(samples: Iterable[Any]) -> list[str]:
    """The text a tokenizer is trained on: every question and answer plus the chat template's fixed text.

    Args:
        samples: objects with ``question`` and ``answer`` (and optionally ``answers``) attributes.
    """
    lines = list(_TEMPLATE_TEXT)
    for s in samples:
        lines.append(str(s.question))
        lines.append(str(s.answer))
        lines.extend(str(a) for a in (getattr(s, "answers", None) or ()))
    return lines


def build_tokenizer(lines: Sequence[str], vocab_size: int = 640) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Qwen2-VL's special tokens, deterministically, offline.

    Args:
        lines: the training corpus (:func:`corpus_lines`).
        vocab_size: target vocabulary size including the 256 byte symbols and the special tokens.

    Returns:
        A fast tokenizer: no BOS, EOS ``<|im_end|>``, pad ``<|endoftext|>``, Qwen2-VL's chat template attached.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not lines:
        raise ValueError("build_tokenizer: empty corpus")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(list(lines), trainer)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=512,
    )
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def build_processor(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.ProcessorMixin:
    """Qwen2-VL's processor around ``tokenizer`` for 112x112 images (16 image tokens), with the chat template."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=IMAGE_SIZE * IMAGE_SIZE,
        max_pixels=IMAGE_SIZE * IMAGE_SIZE,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    cls = no_video(transformers.Qwen2VLProcessor)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_model(
    tokenizer: transformers.PreTrainedTokenizerBase, size: TinyQwen2VLConfig | None = None, seed: int = 0
) -> transformers.Qwen2VLForConditionalGeneration:
    """A randomly initialised Qwen2-VL of the given size whose vocabulary matches ``tokenizer``.

    Args:
        tokenizer: from :func:`build_tokenizer`.
        size: the architecture size; defaults to :class:`TinyQwen2VLConfig`.
        seed: initialisation seed (the global RNG is restored afterwards).
    """
    size = size or TinyQwen2VLConfig()
    head_dim = size.hidden_size // size.num_heads
    if head_dim % 2 or head_dim * size.num_heads != size.hidden_size:
        raise ValueError(f"hidden_size {size.hidden_size} must split into {size.num_heads} heads of even size")
    half = head_dim // 2  # mrope sections (temporal, height, width) sum to head_dim / 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope = [t_sec, h_sec, half - t_sec - h_sec]
    tid = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=size.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
    )
    vision = dict(
        depth=size.vision_depth,
        embed_dim=size.vision_embed_dim,
        hidden_size=size.hidden_size,
        num_heads=size.vision_heads,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = transformers.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    finally:
        torch.random.set_rng_state(state)
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = None
    gen.do_sample = False
    return model.eval()


def chat_messages(question: str) -> list[dict[str, Any]]:
    """One user turn holding the image then the question, the message layout of Qwen2-VL's model card."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def build_prompt(processor: Any, question: str) -> str:
    """The generation prompt for ``question``: ``processor.apply_chat_template(messages, add_generation_prompt=True)``."""
    return processor.apply_chat_template(chat_messages(question), add_generation_prompt=True, tokenize=False)


def training_ids(processor: Any, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of one training example (image tokens not yet expanded) and the prompt length.

    The prompt is tokenized exactly as at generation time and ``answer + eos`` is tokenized on its own and appended,
    so the model learns to continue the very token sequence it is later prompted with.

    Returns:
        ``(ids, n_prompt)``: the loss is taken on ``ids[n_prompt:]`` (the answer and the EOS).
    """
    tok = processor.tokenizer
    prompt = tok(build_prompt(processor, question), add_special_tokens=False)["input_ids"]
    target = tok(str(answer) + tok.eos_token, add_special_tokens=False)["input_ids"]
    return list(prompt) + list(target), len(prompt)


def image_tokens(processor: Any) -> int:
    """How many ``<|image_pad|>`` tokens one benchmark image expands to (16 for 112x112)."""
    ip = processor.image_processor
    return (IMAGE_SIZE // ip.patch_size) ** 2 // ip.merge_size**2


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 112x112 RGB (resized with bicubic filtering only if needed)."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return image
