"""Shared fixtures: the upstream tiny SAT fixture, its converted checkpoints, and models built from it."""
import os
import tempfile
from pathlib import Path

# MindFormers writes its log folder under LOCAL_DEFAULT_PATH (default ./output) at import: keep it out of the repo.
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "visualglm-test-output"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import visualglm  # noqa: E402,F401  before MindSpore: it reads MS_OM_PATH (visualglm.logs) at import
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


# ---- A tiny ChatGLM-6B-style SentencePiece model (tests/test_tokenization.py, tests/test_processing.py) ----
TEST_DATA = Path(__file__).resolve().parent / "data"
CHATGLM_USER_SYMBOLS = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
CHATGLM_CONTROL_SYMBOLS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


def train_chatglm_sp_model(out_dir, name="ice_text_tiny", normalization="identity", vocab_size=1000,
                           chatglm_symbols=True):
    """Train a small unigram SentencePiece model on tests/data/bilingual_corpus.txt with ChatGLM-6B's
    pieces (<n>, <|tab|>, <|blank_2..80|> as user-defined symbols; [MASK], [gMASK], [sMASK], <sop>, <eop>
    ... as control symbols; <unk>/<s>/</s>/<pad> at 0..3) and byte fallback. Deterministic and < 1 s."""
    import sentencepiece as spm
    spm.set_random_generator_seed(1234)
    prefix = os.path.join(str(out_dir), name)
    extra = dict(user_defined_symbols=CHATGLM_USER_SYMBOLS, control_symbols=CHATGLM_CONTROL_SYMBOLS) \
        if chatglm_symbols else {}
    with open(os.devnull, "w") as sink:
        spm.SentencePieceTrainer.train(
            input=str(TEST_DATA / "bilingual_corpus.txt"), model_prefix=prefix, model_type="unigram",
            vocab_size=vocab_size, character_coverage=0.995, byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
            normalization_rule_name=normalization, remove_extra_whitespaces=False,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
            logstream=sink, **extra)
    return prefix + ".model"


@pytest.fixture(scope="session")
def chatglm_vocab_file(tmp_path_factory):
    """Identity normalisation: every text round-trips exactly."""
    return train_chatglm_sp_model(tmp_path_factory.mktemp("sp_identity"))


@pytest.fixture(scope="session")
def chatglm_nfkc_vocab_file(tmp_path_factory):
    """NFKC normalisation like ice_text.model: full-width punctuation comes back as ASCII."""
    return train_chatglm_sp_model(tmp_path_factory.mktemp("sp_nfkc"), normalization="nmt_nfkc")


@pytest.fixture(scope="session")
def chatglm_tokenizer(chatglm_vocab_file):
    from visualglm.tokenization import ChatGLMTokenizer
    return ChatGLMTokenizer(chatglm_vocab_file)


@pytest.fixture(scope="session")
def chatglm_sp(chatglm_vocab_file):
    """The same model through SentencePiece directly (the independent reference)."""
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=chatglm_vocab_file)


# ---- A random tiny VisualGLM whose vocabulary is the test tokenizer's (chat, pipeline and script tests) ----
def tokenizer_matched_config(tokenizer, batch_size=1, use_past=True, seq_length=128, compute_dtype="float32"):
    """Fixture-sized VisualGLM with the tokenizer's vocabulary size and special-token ids."""
    from visualglm.configuration import VisualGLMConfig
    return VisualGLMConfig.from_sat_config(
        str(FIXTURE / "checkpoint"), compute_dtype=compute_dtype, batch_size=batch_size,
        text_config=dict(vocab_size=tokenizer.vocab_size, seq_length=seq_length, use_past=use_past,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
                         smask_token_id=tokenizer.smask_token_id, pad_token_id=tokenizer.pad_token_id))


def randomize_weights(model, seed=0):
    """O(1) activations and clear logit margins: N(0, 1/fan_in) weights, LayerNorm gains 1 ± 0.1."""
    rng = np.random.default_rng(seed)
    for param in model.get_parameters():
        if param.name.endswith(("key_past", "value_past")):
            continue
        shape = tuple(param.shape)
        if param.name.endswith("gamma"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif param.name.endswith(("beta", "bias")):
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2 and not param.name.endswith(("embedding_table", "query_tokens", "pos_embed",
                                                          "cls_tokens")):
            fan_in = shape[-1] if not param.name.endswith(("projection.weight", "mapping.weight")) else shape[0]
            if param.name.endswith("patch_embed.proj.weight"):
                fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:
            value = rng.standard_normal(shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, chatglm_tokenizer):
    """Random weights of the tokenizer-matched tiny model, saved once so every model built from it is equal."""
    from visualglm.modeling import build_model
    model = build_model(tokenizer_matched_config(chatglm_tokenizer, use_past=False))
    randomize_weights(model)
    path = str(tmp_path_factory.mktemp("chat_model") / "random.ckpt")
    ms.save_checkpoint(model, path)
    return path


def load_chat_model(tokenizer, checkpoint, **config_kwargs):
    from visualglm.modeling import build_model
    model = build_model(tokenizer_matched_config(tokenizer, **config_kwargs))
    ms.load_param_into_net(model, ms.load_checkpoint(checkpoint))
    model.set_train(False)
    return model


@pytest.fixture(scope="session")
def chat_model(chatglm_tokenizer, chat_checkpoint):
    return load_chat_model(chatglm_tokenizer, chat_checkpoint)


@pytest.fixture(scope="session")
def chat_processor(chatglm_tokenizer, chat_model):
    from visualglm.processing import VisualGLMProcessor
    return VisualGLMProcessor.from_config(chat_model.config, chatglm_tokenizer)


# ---- yaml files for the tokenizer-matched tiny model (finetune and script tests) ----
def _config_section(config):
    """A VisualGLMConfig as the yaml's model.model_config (sizes, ids and dtypes only)."""
    keep_top = ("batch_size", "freeze_vision", "freeze_text", "max_txt_len", "dtype", "compute_dtype",
                "layernorm_compute_type", "softmax_compute_type", "ln_vision_eps", "image_placeholder_id")
    section = {k: getattr(config, k) for k in keep_top}
    parts = {"vision_config": ("ViTConfig", ("image_size", "patch_size", "num_channels", "hidden_size",
                                             "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                             "layer_norm_eps")),
             "qformer_config": ("QFormerConfig", ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size", "layer_norm_eps", "encoder_width",
                                                  "query_length", "cross_attention_layers")),
             "text_config": ("GLMConfig", ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                           "inner_hidden_size", "seq_length", "layernorm_epsilon", "use_past",
                                           "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id",
                                           "smask_token_id", "pad_token_id"))}
    for key, (type_name, fields) in parts.items():
        part = getattr(config, key)
        section[key] = {"type": type_name, **{f: getattr(part, f) for f in fields}}
    return {"type": "VisualGLMConfig", **section}


def write_tiny_yaml(path, base_yaml, config, checkpoint, vocab_file, pet_config=None, **top_level):
    """Copy of one of the shipped yamls with the tiny model, its whole-model checkpoint, the test tokenizer
    and the CPU; `top_level` replaces top-level sections (e.g. lr_schedule=...)."""
    import yaml
    data = yaml.safe_load(Path(base_yaml).read_text(encoding="utf-8"))
    section = _config_section(config)
    section["checkpoint_name_or_path"] = str(checkpoint)
    if "pet_config" in data["model"]["model_config"]:
        section["pet_config"] = {**data["model"]["model_config"]["pet_config"], **(pet_config or {})}
    data["model"]["model_config"] = section
    data["context"]["device_target"] = "CPU"
    data["processor"]["tokenizer"]["vocab_file"] = str(vocab_file)
    data.update(top_level)
    Path(path).write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return str(path)
