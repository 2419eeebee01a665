"""Builders of the tiny omni model: tokenizer, processor, config and seeded weights.

The classes live in :mod:`mergelab.bench.omni.classes` (the Qwen2.5-Omni thinker with a separate video tower, its
processor). Sizes: images 112x112 (16 tokens), audio 1 s at 16 kHz (32 mel bins, 100 frames, 25 tokens), videos
8 frames of 56x56 (a 4x4x4 patch grid, 16 tokens). The default :class:`OmniSize` is the zoo's LLM (hidden 128,
4 layers) with towers of depth 2: about 1.7M parameters.

Tensor prefixes (the same in memory and on disk: the subclass has its own ``model_type`` and no conversion mapping):

* shared LLM: ``model.language_model.*`` and ``lm_head.weight``;
* image tower ``model.visual.*`` (connector ``model.visual.merger.*``);
* video tower ``model.video_visual.*`` (connector ``model.video_visual.merger.*``);
* audio tower ``model.audio_tower.*`` (connector ``model.audio_tower.{ln_post,proj}.*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mergelab.bench.modeling import IMAGE_SIZE, SPECIAL_TOKENS, TinyQwen2VLConfig
from mergelab.bench.omni.classes import (
    NAMED_TOKENS,
    OmniProcessor,
    OmniThinkerConfig,
    OmniThinkerForConditionalGeneration,
)

SAMPLE_RATE = 16000
"""Audio sampling rate in Hz."""
AUDIO_SECONDS = 1
"""Length of every audio clip (the feature extractor pads or cuts to it)."""
N_MELS = 32
"""Mel bins of the audio features."""
VIDEO_FRAMES = 8
"""Frames per video clip."""
VIDEO_SIZE = 56
"""Side of a video frame in pixels (4x4 patches of 14, merged 2x2: 4 tokens per temporal patch)."""

AUDIO_TOKENS: tuple[str, ...] = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
"""Special tokens added to Qwen2-VL's for audio (Qwen2.5-Omni's names)."""

OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL-Instruct's chat template with an ``audio`` branch (Qwen2.5-Omni's audio markers)."""


@dataclass(frozen=True)
class OmniSize(TinyQwen2VLConfig):
    """Architecture of the omni model: the zoo's LLM and vision-tower sizes (:class:`TinyQwen2VLConfig`; the image
    and video towers are the same shape, MLP width twice their width) plus the audio tower. 1.7M parameters.

    Attributes:
        audio_dim, audio_layers, audio_heads, audio_ffn: the audio tower (Whisper-style encoder).
    """

    audio_dim: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    audio_ffn: int = 128

    @classmethod
    def tiny(cls) -> OmniSize:
        """The zoo's tiny test size with a half-width, one-layer audio tower."""
        return replace(super().tiny(), audio_dim=32, audio_layers=1, audio_heads=2, audio_ffn=64)


AUDIO_CONV_GAIN = 3.0
"""Multiplier on the Kaiming init of the audio tower's input convolutions. Measured on 24 beep clips (default
size, :func:`tower_contrast`): between-clip feature std / across-position std of a silent clip is 0.0007 / 0.106 at
transformers' default init, 0.034 / 0.050 with plain Kaiming, 0.056 / 0.014 at gain 3."""


def build_tokenizer(lines: Sequence[str], vocab_size: int = 640) -> transformers.PreTrainedTokenizerFast:
    """The benchmark's byte-level BPE (Qwen2-VL's special tokens) plus the audio tokens and the named tokens.

    Args:
        lines: training corpus (questions, answers, template text).
        vocab_size: BPE target size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(SPECIAL_TOKENS) + list(AUDIO_TOKENS)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["system\nYou are a helpful assistant.", "user\n", "assistant\n", *lines], trainer)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=dict(NAMED_TOKENS), model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in ("<|im_end|>",
                                                                                              "<|endoftext|>")]})
    tok.chat_template = OMNI_CHAT_TEMPLATE
    return tok


def build_processor(tokenizer: Any) -> OmniProcessor:
    """The omni processor: 112x112 images, 32-mel 1-second audio, numpy-patchified 56x56 video."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    features = WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE, hop_length=160, n_fft=400,
                                       chunk_length=AUDIO_SECONDS)
    return OmniProcessor(image_processor=image_processor, feature_extractor=features, tokenizer=tokenizer,
                         chat_template=OMNI_CHAT_TEMPLATE)


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_config(tokenizer: Any, size: OmniSize | None = None) -> OmniThinkerConfig:
    """The thinker config for ``size`` whose vocabulary and special token ids match ``tokenizer``."""
    size = size or OmniSize()
    tid = tokenizer.convert_tokens_to_ids
    head_dim = size.hidden_size // size.num_heads
    text = dict(vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
                num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
                num_key_value_heads=size.num_kv_heads, max_position_embeddings=size.max_position_embeddings, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(head_dim)})
    tower = dict(depth=size.vision_depth, hidden_size=size.vision_embed_dim,
                 intermediate_size=2 * size.vision_embed_dim, num_heads=size.vision_heads,
                 out_hidden_size=size.hidden_size, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, window_size=112, fullatt_block_indexes=list(range(size.vision_depth)))
    audio = dict(num_mel_bins=N_MELS, encoder_layers=size.audio_layers, d_model=size.audio_dim,
                 encoder_attention_heads=size.audio_heads, encoder_ffn_dim=size.audio_ffn,
                 output_dim=size.hidden_size, max_source_positions=200, n_window=50)
    return OmniThinkerConfig(
        text_config=text, vision_config=dict(tower), video_config=dict(tower), audio_config=audio,
        image_token_index=tid("<|image_pad|>"), video_token_index=tid("<|video_pad|>"),
        audio_token_index=tid("<|AUDIO|>"), audio_start_token_id=tid("<|audio_bos|>"),
        audio_end_token_id=tid("<|audio_eos|>"), vision_start_token_id=tid("<|vision_start|>"),
        tie_word_embeddings=False)


def build_model(tokenizer: Any, size: OmniSize | None = None, seed: int = 0) -> OmniThinkerForConditionalGeneration:
    """A seeded, randomly initialised omni thinker (the global RNG is restored afterwards).

    The audio tower's two input convolutions get a seeded Kaiming re-init times :data:`AUDIO_CONV_GAIN`: at the
    default std 0.02 their output (std about 0.008) drowns under the sinusoidal position embedding (std 0.63), and
    a frozen tower's features hardly vary between clips (:func:`tower_contrast` checks every tower).
    """
    cfg = build_config(tokenizer, size)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = OmniThinkerForConditionalGeneration(cfg)
        with torch.no_grad():
            for conv in (model.model.audio_tower.conv1, model.model.audio_tower.conv2):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                conv.weight.mul_(AUDIO_CONV_GAIN)
                conv.bias.zero_()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=None, do_sample=False)
    return model.eval()


@torch.no_grad()
def tower_features(model: Any, processor: Any, modality: str, media: Sequence[Any]) -> torch.Tensor:
    """The tokens a tower (connector included) gives the LLM for each input: ``(inputs, tokens, hidden)``.

    Args:
        model: an omni thinker.
        processor: its processor.
        modality: ``image``, ``audio`` or ``video``.
        media: PIL images, float32 waveforms or ``(T, H, W, 3)`` uint8 clips (all of one size).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prompt = {"image": "<|image_pad|>", "audio": "<|AUDIO|>", "video": "<|video_pad|>"}[modality]
    key = {"image": "images", "audio": "audio", "video": "videos"}[modality]
    inputs = processor(text=[prompt] * len(media), **{key: list(media)}, return_tensors="pt", padding=True)
    if modality == "image":
        out = inner.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    elif modality == "video":
        out = inner.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    else:
        out = inner.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    pooled = out.pooler_output
    feats = torch.stack(list(pooled)) if isinstance(pooled, (tuple, list)) else pooled.view(len(media), -1,
                                                                                           pooled.shape[-1])
    return feats.float()


def blank_medium(modality: str) -> Any:
    """An input without content: a white image, one second of silence, a black clip."""
    if modality == "image":
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    if modality == "audio":
        return np.zeros(SAMPLE_RATE * AUDIO_SECONDS, dtype=np.float32)
    return np.zeros((VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3), dtype=np.uint8)


def tower_contrast(features: torch.Tensor, blank: torch.Tensor) -> tuple[float, float]:
    """``(between, across)``: the std of a tower's ``(inputs, tokens, hidden)`` features over inputs at one token
    position, and the std over positions of its features for an input without content (``blank``, ``(1, tokens,
    hidden)``: what position alone produces), both averaged over the rest. A tower that sees its inputs has
    ``between > across``; one whose output is mostly its position embedding has ``between`` near 0."""
    return float(features.std(dim=0).mean()), float(blank[0].std(dim=0).mean())


def chat_messages(modalities: Sequence[str], question: str) -> list[dict[str, Any]]:
    """One user turn: the media in ``modalities`` (image, audio, video order) then the question."""
    order = [m for m in ("image", "audio", "video") if m in modalities]
    return [{"role": "user", "content": [{"type": m} for m in order] + [{"type": "text", "text": question}]}]


def build_prompt(processor: Any, modalities: Sequence[str], question: str) -> str:
    """The generation prompt: ``processor.apply_chat_template(messages, add_generation_prompt=True)``."""
    return processor.apply_chat_template(chat_messages(modalities, question), add_generation_prompt=True,
                                         tokenize=False)
