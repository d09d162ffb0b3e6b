"""The MindFormers pipeline task `visualglm_image_to_text_generation` (spec §16.2).

Importing `visualglm` registers it, so after building a model:

    from mindformers import pipeline
    pipe = pipeline(task="visualglm_image_to_text_generation", model=model, image_processor=image_processor,
                    tokenizer=tokenizer, batch_size=2, max_new_tokens=64)
    pipe({"image": "examples/red_circle.png", "prompt": "描述这张图片。"})          # -> ['answer']
    pipe([{"image": a, "prompt": q1}, {"image": b, "prompt": q2}], do_sample=True, top_k=5)

Registration: the class is registered as MindFormers PIPELINE under the task name (what `build_pipeline`
instantiates), and the task is added to MindFormers' pipeline task list (`MindFormerBook`'s, the same dict as
`mindformers.pipeline.pipeline.SUPPORT_PIPELINES`) with the full-size yaml as its "common" config, which
`mindformers.pipeline()` reads before building the task (the tokenizer and image processor are built from it
when not passed).

Unlike the MindFormers original, generation keyword arguments (max_new_tokens, max_length, do_sample, top_k,
top_p, temperature, repetition_penalty, seed), given when the pipeline is made or per call, are honoured;
prompts are not padded to 32 tokens and may contain commas; any number of inputs is answered (the engine runs
them in chunks of the model's batch size).
"""
import importlib
import os
from collections import OrderedDict
from dataclasses import fields

from mindspore import Model, nn
from mindformers.mindformer_book import MindFormerBook
from mindformers.pipeline.base_pipeline import Pipeline
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from visualglm.chat import VisualGLMChat
from visualglm.errors import UserError
from visualglm.generation import GenerationConfig

__all__ = ["TASK", "VisualGLMImageToTextPipeline"]

TASK = "visualglm_image_to_text_generation"
TASK_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "run_visualglm_6b_image_to_text_generation.yaml")
GENERATION_KEYS = tuple(f.name for f in fields(GenerationConfig))


@MindFormerRegister.register(MindFormerModuleType.PIPELINE, alias=TASK)
class VisualGLMImageToTextPipeline(Pipeline):
    """Answers about images with VisualGLM.

    Args:
        model: a VisualGLMModel (or a `mindspore.Model` wrapping one).
        tokenizer: a ChatGLMTokenizer (or pass `processor`).
        image_processor: a VisualGLMImageProcessor (default: from the model config).
        processor: a VisualGLMProcessor (default: built from tokenizer, image_processor and the model config).
        batch_size: kept for MindFormers; the batch generated together is the model's (its config batch_size
            with the KV cache); any number of inputs is accepted.
        use_past: decode with the KV cache (default: as the model was built).
        english: English prompt template by default.
        **kwargs: default generation options (GenerationConfig fields: max_new_tokens, do_sample, top_k, ...).

    Call with `{"image": ..., "prompt": ...}` (image: a path, PIL image, uint8 array or None for text-only;
    optional "history": [(query, answer), ...]), a list of such dicts, or one dict with lists of images and
    prompts (a single prompt applies to every image). Returns the list of answers, in input order.
    """

    def __init__(self, model, tokenizer=None, image_processor=None, processor=None, batch_size=None,
                 use_past=None, english=False, framework="ms", task=TASK, feature_extractor=None,
                 audio_processor=None, **kwargs):
        # Pipeline.__init__ only accepts MindFormers' PreTrainedModel; VisualGLMModel is a plain Cell.
        network = model.predict_network if isinstance(model, Model) else model
        if not isinstance(network, nn.Cell) or not hasattr(network, "config"):
            raise UserError(f"{TASK} needs a VisualGLMModel, got {type(model).__name__}")
        self.model = model
        self.network = network
        self.framework = framework
        self.task = task
        self.binary_output = False
        self.feature_extractor = feature_extractor
        if processor is None:
            # Imported here: MindFormers' first import (e.g. from visualglm.processing) registers this module
            # (visualglm.logs), and processing may then be half-initialised.
            from visualglm.processing import VisualGLMImageProcessor, VisualGLMProcessor
            if tokenizer is None:
                raise UserError(f"{TASK} needs a tokenizer (or a VisualGLMProcessor as processor=)")
            if image_processor is None:
                image_processor = VisualGLMImageProcessor.from_config(network.config)
            processor = VisualGLMProcessor.from_config(network.config, tokenizer, image_processor)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.english = english
        self._preprocess_params, self._forward_params, self._postprocess_params = \
            self._sanitize_parameters(**kwargs)
        self.engine = VisualGLMChat(network, processor, GenerationConfig(), use_past=use_past)
        self._batcher = None    # the continuous-batching engine, started on first use
        self.call_count = 0
        self._batch_size = batch_size

    def _sanitize_parameters(self, english=None, **kwargs):
        unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise UserError(f"{TASK}: unknown option(s) {', '.join(unknown)}; generation options are "
                            f"{', '.join(GENERATION_KEYS)}")
        forward = dict(kwargs)
        preprocess, postprocess = {}, {}
        if english is not None:
            preprocess["english"] = postprocess["english"] = forward["english"] = bool(english)
        return preprocess, forward, postprocess

    def __call__(self, inputs, batch_size=None, **kwargs):
        """Answers (a list of strings, one per input)."""
        preprocess, forward, postprocess = self._sanitize_parameters(**kwargs)
        preprocess = {**self._preprocess_params, **preprocess}
        forward = {**self._forward_params, **forward}
        postprocess = {**self._postprocess_params, **postprocess}
        self.call_count += 1
        return self.run_single(inputs, preprocess, forward, postprocess)

    def run_multi(self, inputs, batch_size, preprocess_params, forward_params, postprocess_params):
        return self.run_single(inputs, preprocess_params, forward_params, postprocess_params)

    # ----- the three stages -----
    def preprocess(self, inputs, english=None, **_):
        """inputs -> [(image, query, history)]."""
        samples = []
        for item in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            samples.extend(_samples_of(item))
        if not samples:
            raise UserError(f"{TASK}: no input given")
        return samples

    def _forward(self, model_inputs, english=None, **generation):
        """Generated ids of every sample: through the continuous-batching engine (the model's batch_size
        slots, each sample leaving as soon as it ends) with the KV cache, else in chunks of the batch size."""
        english = self.english if english is None else english
        if self.engine.use_past:
            return {"output_ids": self._batched(model_inputs, english, generation)}
        step = self.engine.batch_size
        ids = []
        for begin in range(0, len(model_inputs), step):
            chunk = model_inputs[begin:begin + step]
            out = [[] for _ in chunk]
            for out in self.engine.stream_ids(chunk, english, **generation):
                pass
            ids.extend(out)
        return {"output_ids": ids}

    def _batched(self, samples, english, generation):
        from visualglm.batching import BatchEngine, Request
        if self._batcher is None:
            self._batcher = BatchEngine(self.network, max_queue=1 << 30)   # a local caller: no refusals
        config = self.engine.config_for(english, **generation)
        requests = []
        for image, query, history in samples:
            inputs = self.processor(query, image=image, history=history, english=english)
            requests.append(self._batcher.submit(Request(inputs["input_ids"], config, image_start=inputs["image_start"],
                                                         pixel_values=inputs["pixel_values"])))
        return [request.wait() for request in requests]

    def postprocess(self, model_outputs, english=None, **_):
        english = self.english if english is None else english
        return [self.processor.decode_response(ids, english=english) for ids in model_outputs["output_ids"]]


def _split_legacy(value):
    """The MindFormers pipeline's comma-separated string of images, used only when no such file exists."""
    if isinstance(value, str) and "," in value and not os.path.exists(value):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _samples_of(item):
    if not isinstance(item, dict):
        raise UserError(f'{TASK}: each input is a dict {{"image": ..., "prompt": ...}}, got {type(item).__name__}')
    unknown = sorted(set(item) - {"image", "prompt", "text", "history"})
    if unknown:
        raise UserError(f"{TASK}: unknown input key(s) {', '.join(unknown)} (expected image, prompt, history)")
    images = _split_legacy(item.get("image"))
    prompts = item.get("prompt", item.get("text", ""))
    if isinstance(images, list) and isinstance(item.get("image"), str) and isinstance(prompts, str):
        parts = prompts.split(",")   # the legacy form splits the prompts too, when the counts match
        prompts = [p.strip() for p in parts] if len(parts) == len(images) else prompts
    history = item.get("history") or ()
    if not isinstance(images, (list, tuple)):
        return [(images, _prompt(prompts), history)]
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(prompts) != len(images):
        raise UserError(f"{TASK}: {len(images)} images but {len(prompts)} prompts")
    return [(image, _prompt(prompt), history) for image, prompt in zip(images, prompts)]


def _prompt(value):
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{TASK}: a prompt must be a string, got {type(value).__name__}")
    return value


def register_task():
    """Add the task to MindFormers' pipeline task list (`SUPPORT_PIPELINES`), with the full-size yaml."""
    tasks = MindFormerBook.get_pipeline_support_task_list()
    tasks.setdefault(TASK, OrderedDict())["common"] = TASK_CONFIG
    # The module-level copy mindformers.pipeline() checks (the same dict in MindFormers 1.9).
    support = getattr(importlib.import_module("mindformers.pipeline.pipeline"), "SUPPORT_PIPELINES", None)
    if support is not None and support is not tasks:
        support.setdefault(TASK, OrderedDict())["common"] = TASK_CONFIG


register_task()
