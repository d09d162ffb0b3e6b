"""VisualGLM-6B for MindSpore: EVA-CLIP ViT + BLIP-2 Q-Former + ChatGLM-6B."""
from visualglm.configuration import (
    GLMConfig, QFormerConfig, ViTConfig, VisualGLMConfig,
)
# Registers the MindFormers pipeline task "visualglm_image_to_text_generation".
from visualglm import pipeline as _pipeline  # noqa: E402,F401  pylint: disable=wrong-import-position

__all__ = ["VisualGLMConfig", "ViTConfig", "QFormerConfig", "GLMConfig"]
