"""VisualGLM-6B for MindSpore: EVA-CLIP ViT + BLIP-2 Q-Former + ChatGLM-6B.

Importing the package is cheap: it sets up the libraries' logs (`visualglm.logs`) and registers the MindFormers
pipeline task "visualglm_image_to_text_generation" once MindFormers is imported; the configuration classes
below are imported on first use.
"""
from visualglm import logs as _logs

_logs.install()

__all__ = ["VisualGLMConfig", "ViTConfig", "QFormerConfig", "GLMConfig"]


def __getattr__(name):
    if name in __all__:
        from visualglm import configuration
        return getattr(configuration, name)
    raise AttributeError(f"module 'visualglm' has no attribute {name!r}")
