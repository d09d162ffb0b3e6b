"""Shared fixtures: the upstream tiny SAT fixture, its converted checkpoints, and models built from it."""
import os
import tempfile
from pathlib import Path

# MindFormers writes its log folder under LOCAL_DEFAULT_PATH (default ./output) at import: keep it out of the repo.
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "visualglm-test-output"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import mindspore as ms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "visualglm_tiny_sat"
SCRIPTS = REPO / "research" / "visualglm"

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


@pytest.fixture(scope="session")
def fixture_inputs():
    return dict(np.load(FIXTURE / "inputs.npz"))


@pytest.fixture(scope="session")
def golden():
    return dict(np.load(FIXTURE / "golden.npz"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The fixture's SAT checkpoint converted once: {'vit', 'qformer', 'glm'} -> path."""
    from visualglm.conversion import convert_checkpoint
    out = tmp_path_factory.mktemp("tiny_ckpt")
    paths = {"vit": str(out / "vit.ckpt"), "qformer": str(out / "qformer.ckpt"), "glm": str(out / "glm.ckpt")}
    convert_checkpoint(str(FIXTURE / "checkpoint"), paths, show_progress=False)
    return paths


def tiny_config(compute_dtype="float32", batch_size=1, **text_config):
    from visualglm.configuration import VisualGLMConfig
    return VisualGLMConfig.from_sat_config(str(FIXTURE / "checkpoint"), compute_dtype=compute_dtype,
                                           batch_size=batch_size, text_config=text_config)


def load_tiny_model(checkpoints, compute_dtype="float32", batch_size=1, **text_config):
    from visualglm.modeling import build_model, load_weights
    model = build_model(tiny_config(compute_dtype, batch_size, **text_config))
    load_weights(model, **checkpoints)
    model.set_train(False)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoints):
    """fp32 tiny model with a 64-token KV cache for one sequence."""
    return load_tiny_model(tiny_checkpoints, seq_length=64, use_past=True)


def rel_error(actual, expected):
    """max|actual - expected| / max|expected|."""
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())
