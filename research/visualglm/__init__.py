"""VisualGLM-6B for MindSpore: EVA-CLIP ViT + BLIP-2 Q-Former + ChatGLM-6B."""
import os

# MindSpore prints a deprecation warning from inside MindFormers at import; keep its log at errors unless
# the user chose a level (GLOG_v), so that scripts' errors stay one line.
os.environ.setdefault("GLOG_v", "3")
# MindFormers creates its log folder under LOCAL_DEFAULT_PATH (default: ./output) when it is imported: keep it
# out of the user's current folder, in a cache folder, unless the user chose a place.
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "visualglm", "mindformers"))

# pylint: disable=wrong-import-position
from visualglm.configuration import (
    GLMConfig, QFormerConfig, ViTConfig, VisualGLMConfig,
)
# Registers the MindFormers pipeline task "visualglm_image_to_text_generation".
from visualglm import pipeline as _pipeline  # noqa: E402,F401  pylint: disable=wrong-import-position

__all__ = ["VisualGLMConfig", "ViTConfig", "QFormerConfig", "GLMConfig"]
