"""VisualGLM-6B for MindSpore: EVA-CLIP ViT + BLIP-2 Q-Former + ChatGLM-6B."""
import os

# MindSpore prints a deprecation warning from inside MindFormers at import; keep its C++ log at errors
# unless the user chose a level (GLOG_v).
os.environ.setdefault("GLOG_v", "3")

# pylint: disable=wrong-import-position
from visualglm.configuration import (
    GLMConfig, QFormerConfig, ViTConfig, VisualGLMConfig,
)

__all__ = ["VisualGLMConfig", "ViTConfig", "QFormerConfig", "GLMConfig"]
