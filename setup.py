"""VisualGLM-6B for MindSpore: the `visualglm` package lives in research/visualglm/."""
from setuptools import setup

setup(
    name="visualglm-mindspore",
    version="0.1.0",
    description="VisualGLM-6B (EVA-CLIP ViT + BLIP-2 Q-Former + ChatGLM-6B) ported to MindSpore",
    python_requires=">=3.9,<3.12",
    package_dir={"": "research"},
    packages=["visualglm", "visualglm.demo", "visualglm.kernels"],
    package_data={"visualglm": ["*.yaml"], "visualglm.demo": ["weights/*"], "visualglm.kernels": ["*.cc"]},
    install_requires=[
        "mindspore==2.9.0",
        "mindformers==1.9.0",
        "mindpet==1.0.4",
        "numpy<2",
        "pillow",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        # the CLI chat, web demo and HTTP API
        "fastapi==0.163.2",
        "uvicorn==0.54.0",
        "gradio==5.50.0",   # the newest whose huggingface-hub fits transformers (mindformers)
        "openai==3.57.0",
        "httpx==0.28.1",
    ],
    extras_require={
        # torch only reads PyTorch (SAT) checkpoints in convert_weight.py; 2.13.0 is the local CPU wheel.
        "convert": ["torch==2.13.0"],
        # selenium drives Debian's chromium/chromium-driver in the web demo test; pexpect the CLI test
        "test": ["torch==2.13.0", "pytest", "selenium==4.51.0", "pexpect==4.8.0"],
    },
)
