"""The omni model's transformers classes: the three-tower Qwen2.5-Omni thinker, its config and its processor.

This module imports only numpy, torch and transformers (no other mergelab module), so that
:mod:`mergelab.bench.omni.hook` can import it from inside any import of transformers without an import cycle.
:mod:`mergelab.bench.omni.modeling` builds the tiny seeded instances.

* :class:`OmniThinkerForConditionalGeneration`: the stock ``Qwen2_5OmniThinkerForConditionalGeneration`` (one
  ``visual`` tower for images *and* videos, one ``audio_tower``) plus ``model.video_visual``, a second vision encoder
  of the same shape that ``get_video_features`` uses instead, so that each modality has its own encoder and
  connector (the paper's CLIP / BEATs / LanguageBind-Video stacks, each owned by one expert).
* :class:`OmniProcessor`: Qwen2.5-Omni's processor without a video processor (transformers builds that only with
  torchvision); videos are ``(T, H, W, 3)`` uint8 arrays patchified in numpy (:func:`patchify_video`).
* :func:`register` registers all three with ``AutoConfig``, ``AutoModelForImageTextToText`` and ``AutoProcessor``
  under ``model_type`` :data:`MODEL_TYPE`; it runs when this module is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedConfig,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
)
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniVisionEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniThinkerModel,
    Qwen2_5OmniVisionEncoder,
)
from transformers.processing_utils import ProcessorMixin
from transformers.utils.generic import accepts_precomputed_kwargs

MODEL_TYPE = "mergelab_omni_thinker"
"""The ``model_type`` of the three-tower thinker in ``config.json``."""

VIDEO_FPS = 2.0
"""Nominal frame rate of a clip; with a temporal patch of 2 frames each grid step is one second of rotary time."""

NAMED_TOKENS: dict[str, str] = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
"""The named special tokens the Omni processor reads from its tokenizer."""


class OmniThinkerConfig(Qwen2_5OmniThinkerConfig):
    """Qwen2.5-Omni thinker config plus ``video_config``, the separate video tower's vision-encoder config."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {**Qwen2_5OmniThinkerConfig.sub_configs_defaults,
                            "video_config": Qwen2_5OmniVisionEncoderConfig}
    video_config: dict | PreTrainedConfig | None = None


class OmniThinkerModel(Qwen2_5OmniThinkerModel):
    """The thinker's inner model with ``video_visual``, a vision encoder used for videos only."""

    config_class = OmniThinkerConfig

    def __init__(self, config: OmniThinkerConfig) -> None:
        super().__init__(config)
        self.video_visual = Qwen2_5OmniVisionEncoder._from_config(config.video_config)
        self.post_init()

    @accepts_precomputed_kwargs(modality="video")
    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None,
                           **kwargs: Any) -> Any:
        """Video tokens from ``video_visual`` (the stock thinker uses ``visual``), split per video."""
        out = self.video_visual(pixel_values_videos.type(self.video_visual.dtype), grid_thw=video_grid_thw,
                                **kwargs)
        split = (video_grid_thw.prod(-1) // self.video_visual.spatial_merge_size**2).tolist()
        out.pooler_output = torch.split(out.pooler_output, split)
        return out


class OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerForConditionalGeneration):
    """The Qwen2.5-Omni thinker with three towers: ``visual`` (images), ``video_visual`` (videos), ``audio_tower``."""

    config_class = OmniThinkerConfig

    def __init__(self, config: OmniThinkerConfig) -> None:
        super().__init__(config)
        self.model = OmniThinkerModel(config)
        self.post_init()


def patchify_video(frames: np.ndarray, mean: Sequence[float], std: Sequence[float], rescale: float, *,
                   patch: int = 14, temporal: int = 2, merge: int = 2) -> tuple[np.ndarray, list[int]]:
    """Qwen2-VL pixel patches of one clip, in ``Qwen2VLImageProcessor``'s (merge-window) order, in numpy.

    Args:
        frames: ``(T, H, W, 3)`` uint8; T a multiple of ``temporal``, H and W multiples of ``patch * merge``.
        mean, std, rescale: the image processor's normalisation.
        patch, temporal, merge: patch side, frames per temporal patch, spatial merge size.

    Returns:
        ``(patches (t*h*w, 3*temporal*patch*patch) float32, [t, h, w])``.
    """
    t, h, w, c = frames.shape
    if t % temporal or h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"patchify_video: clip shape {frames.shape} does not tile into patches")
    x = (frames.astype(np.float32) * rescale - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = x.transpose(0, 3, 1, 2)  # (T, C, H, W)
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = x.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal * patch * patch)), [gt, gh, gw]


class OmniProcessor(Qwen2_5OmniProcessor):
    """Qwen2.5-Omni's processor without a video processor: videos are uint8 ``(T, H, W, 3)`` arrays, patchified in
    numpy with the image processor's settings (:func:`patchify_video`)."""

    def __init__(self, image_processor: Any = None, feature_extractor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        ProcessorMixin.__init__(self, image_processor, feature_extractor, tokenizer, chat_template=chat_template)
        self.video_processor = None
        for name in NAMED_TOKENS:
            setattr(self, name, getattr(tokenizer, name))
        for name in ("image_token", "audio_token", "video_token"):
            setattr(self, f"{name}_id", tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)))

    def _process_videos(self, videos: Any, audio: Any = None, processed_audio: Any = None,
                        video_to_audio_indices: Any = None, **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
        ip = self.image_processor
        clips = [np.asarray(v) for v in (videos if isinstance(videos, (list, tuple)) else [videos])]
        patches, grids = [], []
        for clip in clips:
            p, g = patchify_video(clip, ip.image_mean, ip.image_std, float(ip.rescale_factor), patch=ip.patch_size,
                                  temporal=ip.temporal_patch_size, merge=ip.merge_size)
            patches.append(p)
            grids.append(g)
        out = {"pixel_values_videos": torch.from_numpy(np.concatenate(patches)),
               "video_grid_thw": torch.tensor(grids, dtype=torch.long),
               "video_second_per_grid": torch.tensor([ip.temporal_patch_size / VIDEO_FPS] * len(grids))}
        return out, [self.video_token * (int(np.prod(g)) // ip.merge_size**2) for g in grids]


def register() -> None:
    """Register the omni config, model and processor with ``AutoConfig``, ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` (idempotent)."""
    if MODEL_TYPE in transformers.models.auto.configuration_auto.CONFIG_MAPPING._extra_content:
        return
    AutoConfig.register(MODEL_TYPE, OmniThinkerConfig)
    AutoModelForImageTextToText.register(OmniThinkerConfig, OmniThinkerForConditionalGeneration)
    AutoProcessor.register(OmniThinkerConfig, OmniProcessor)


register()
