"""VisualGLM-6B for MindSpore: EVA-CLIP ViT + BLIP-2 Q-Former + ChatGLM-6B."""
from visualglm.configuration import (
    GLMConfig, QFormerConfig, ViTConfig, VisualGLMConfig,
)

__all__ = ["VisualGLMConfig", "ViTConfig", "QFormerConfig", "GLMConfig"]
