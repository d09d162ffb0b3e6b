"""The MindFormers pipeline task visualglm_image_to_text_generation (research/visualglm/pipeline.py): its
registration, answers equal to VisualGLMChat, generation options honoured (MindFormers dropped them), and
run_visualglm_pipeline.py end to end."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SCRIPTS
from test_run_scripts import assert_ok, jsonl_pairs, responses, run_script, script_env, write_tiny_yaml
from visualglm.chat import VisualGLMChat
from visualglm.errors import UserError
from visualglm.generation import GenerationConfig
from visualglm.pipeline import TASK, TASK_CONFIG, VisualGLMImageToTextPipeline
from visualglm.processing import VisualGLMImageProcessor

RED, SHAPES = str(REPO / "examples/red_circle.png"), str(REPO / "examples/shapes.png")


@pytest.fixture(scope="module", autouse=True)
def script_run(tmp_path_factory, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    """run_visualglm_pipeline.py from research/visualglm, started in the background with the module."""
    tmp = tmp_path_factory.mktemp("pipeline_run")
    config = write_tiny_yaml(tmp / "tiny.yaml", chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file)
    args = ["--config", config, "--input_file", "examples/example_inputs.jsonl", "--batch_size", "2",
            "--max_new_tokens", "5", "--device_target", "CPU", "--verbose"]
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(run_script, SCRIPTS / "run_visualglm_pipeline.py", args, SCRIPTS, script_env(tmp))
    yield future
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def engine(chat_model, chat_processor):
    return VisualGLMChat(chat_model, chat_processor, GenerationConfig())


@pytest.fixture(scope="module")
def make_pipe(chat_model, chatglm_tokenizer):
    from mindformers import pipeline

    def make(**kwargs):
        return pipeline(task=TASK, model=chat_model, tokenizer=chatglm_tokenizer,
                        image_processor=VisualGLMImageProcessor.from_config(chat_model.config), **kwargs)
    return make


def test_task_is_registered_with_mindformers():
    from mindformers.mindformer_book import MindFormerBook
    from mindformers.pipeline.pipeline import SUPPORT_PIPELINES
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    assert MindFormerRegister.get_cls(MindFormerModuleType.PIPELINE, TASK) is VisualGLMImageToTextPipeline
    assert SUPPORT_PIPELINES[TASK]["common"] == TASK_CONFIG
    assert MindFormerBook.get_pipeline_support_task_list()[TASK]["common"] == TASK_CONFIG
    assert TASK_CONFIG.endswith("run_visualglm_6b_image_to_text_generation.yaml")
    assert (SCRIPTS / "run_visualglm_6b_image_to_text_generation.yaml").samefile(TASK_CONFIG)


def test_pipeline_answers_equal_the_engine(make_pipe, engine):
    pipe = make_pipe(batch_size=1, max_new_tokens=8)
    upside_down = np.asarray(Image.open(RED).convert("RGB"))[::-1].copy()
    assert pipe({"image": RED, "prompt": "描述这张图片。"}) == engine.generate([RED], ["描述这张图片。"],
                                                                             max_new_tokens=8)
    inputs = [{"image": RED, "prompt": "What is it, and where?"}, {"image": upside_down, "prompt": "图中有什么？"},
              {"image": None, "prompt": "你好"}]
    assert pipe(inputs) == engine.generate([RED, upside_down, None], ["What is it, and where?", "图中有什么？", "你好"],
                                           max_new_tokens=8)
    # one dict with lists (a single prompt for every image) and the MindFormers comma-separated form
    both = engine.generate([RED, SHAPES], ["描述这张图片。"] * 2, max_new_tokens=8)
    assert pipe({"image": [RED, SHAPES], "prompt": "描述这张图片。"}) == both
    assert pipe({"image": f"{RED},{SHAPES}", "prompt": "描述这张图片。,描述这张图片。"}) == both


def test_generation_options_are_honoured(make_pipe, engine):
    pipe = make_pipe(batch_size=1, max_new_tokens=8)
    sample = {"image": SHAPES, "prompt": "图中有几个三角形？"}
    eight = pipe(sample)
    three = pipe(sample, max_new_tokens=3)
    assert three == engine.generate([SHAPES], [sample["prompt"]], max_new_tokens=3)
    assert three != eight
    ids = pipe._forward(pipe.preprocess(sample), max_new_tokens=3)["output_ids"]
    assert len(ids) == 1 and 1 <= len(ids[0]) <= 3
    assert make_pipe(max_new_tokens=3)(sample) == three             # defaults given when the pipeline is made
    sampled = pipe(sample, do_sample=True, temperature=5.0, top_k=50, top_p=0.9, seed=7)
    assert sampled == engine.generate([SHAPES], [sample["prompt"]], max_new_tokens=8, do_sample=True,
                                      temperature=5.0, top_k=50, top_p=0.9, seed=7)
    assert sampled != eight


def test_bad_pipeline_inputs(make_pipe, chat_model):
    from mindformers import pipeline
    pipe = make_pipe(max_new_tokens=4)
    with pytest.raises(UserError, match="unknown option"):
        pipe({"image": RED, "prompt": "q"}, max_tokens=3)
    with pytest.raises(UserError, match="2 images but 3 prompts"):
        pipe({"image": [RED, SHAPES], "prompt": ["a", "b", "c"]})
    with pytest.raises(UserError, match="not found"):
        pipe({"image": "no/such.png", "prompt": "q"})
    with pytest.raises(UserError, match="temperature"):
        pipe({"image": RED, "prompt": "q"}, temperature=0)
    # without a tokenizer MindFormers builds the task yaml's one: the full-size placeholder path is reported
    with pytest.raises(UserError, match="ice_text.model"):
        pipeline(task=TASK, model=chat_model)


def test_pipeline_script_from_the_script_folder(script_run, engine):
    result = script_run.result()
    assert_ok(result)
    # the upstream log line on stderr; stdout holds the Response lines only
    assert "batch_size is 2" in result.stderr and "batch_size is" not in result.stdout
    assert all(line.startswith("Response: [") for line in result.stdout.splitlines())
    pairs = jsonl_pairs()
    images = [str(REPO / image) for image, _ in pairs]
    assert responses(result.stdout) == [engine.generate(images, [p for _, p in pairs], max_new_tokens=5)]
    assert result.stdout.splitlines()[-1].startswith("Response: [")
