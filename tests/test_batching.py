"""Continuous batching (visualglm.batching) on the shipped demo model: answers do not depend on what else is in
the batch (greedy ids and seeded samples equal those of the request alone, as run_visualglm.py generates
them), slots are reused as requests end, a cancelled request frees its slot at the next step, and requests
that cannot run are refused before they take a slot."""
import argparse
import pytest

from conftest import REPO
from visualglm import app, serving
from visualglm.batching import BatchEngine, QueueFull, Request
from visualglm.chat import VisualGLMChat
from visualglm.generation import GenerationConfig, SequenceTooLongError
from visualglm.processing import load_image

NEW_TOKENS = 16
# (image or None, question): Chinese and English, with and without an image
CASES = [("examples/demo_blue_square.png", "描述这张图片。"), ("examples/demo_triangles.png", "图中有几个三角形？"),
         ("examples/demo_star.png", "这是什么形状？"), ("examples/red_circle.png", "Describe the image."),
         ("examples/shapes.png", "图中有什么颜色？"), (None, "你好"), ("examples/demo_triangles.png", "描述这张图片。"),
         ("examples/demo_blue_square.png", "What colour is the square?")]


def _components(batch_size):
    parser = serving.add_chat_args(argparse.ArgumentParser())
    args = parser.parse_args(["--device_target", "CPU", "--batch_size", str(batch_size)])
    args.max_length = args.max_new_tokens = None
    args.do_sample, args.top_k, args.top_p, args.temperature, args.repetition_penalty = False, 0, 1.0, 1.0, 1.0
    args.seq_length, args.use_past = None, True
    return app.build_components(args)


@pytest.fixture(scope="module")
def alone():
    """The demo model with one sequence, as run_visualglm.py builds it (batch_size 1)."""
    parts = _components(1)
    return VisualGLMChat(parts.model, parts.processor, GenerationConfig())


@pytest.fixture(scope="module")
def batched():
    """The demo model with 4 KV-cache slots and its engine."""
    parts = _components(4)
    engine = BatchEngine(parts.model, max_queue=16)
    yield parts, engine
    engine.shutdown(cancel=True, timeout=30)


def _english(text):
    return not serving.is_chinese(text)


def _request(parts, image, query, **config):
    inputs = parts.processor(query, image=None if image is None else load_image(str(REPO / image)),
                             english=_english(query))
    return Request(inputs["input_ids"], GenerationConfig(**config), image_start=inputs["image_start"],
                   pixel_values=inputs["pixel_values"])


def _alone(chat, image, query, **config):
    sample = (None if image is None else load_image(str(REPO / image)), query, [])
    ids = [[]]
    for ids in chat.stream_ids([sample], _english(query), **config):
        pass
    return ids[0]


def test_eight_requests_on_four_slots_answer_as_each_alone(alone, batched):
    """Greedy: 8 different requests submitted at once to 4 slots (so slots are reused as requests end) give
    exactly the token ids each gives alone."""
    parts, engine = batched
    expected = [_alone(alone, image, query, max_new_tokens=NEW_TOKENS) for image, query in CASES]
    requests = [engine.submit(_request(parts, image, query, max_new_tokens=NEW_TOKENS)) for image, query in CASES]
    got = [request.wait(300) for request in requests]
    assert got == expected
    assert all(r.finish_reason in ("stop", "length") for r in requests)
    assert engine.status()["active"] == 0 and engine.status()["waiting"] == 0


def test_seeded_sampling_is_the_same_batched_or_alone(alone, batched):
    parts, engine = batched
    sampling = dict(do_sample=True, temperature=0.9, top_p=0.8, top_k=50, seed=1234, max_new_tokens=NEW_TOKENS)
    expected = _alone(alone, *CASES[0], **sampling)
    others = [engine.submit(_request(parts, image, query, max_new_tokens=NEW_TOKENS, do_sample=True, seed=i))
              for i, (image, query) in enumerate(CASES[1:4])]
    sampled = engine.submit(_request(parts, *CASES[0], **sampling))
    assert sampled.wait(300) == expected
    for other in others:
        other.wait(300)


def test_streamed_tokens_arrive_one_by_one_and_end_with_the_reason(batched):
    parts, engine = batched
    request = engine.submit(_request(parts, *CASES[0], max_new_tokens=3, min_new_tokens=3))
    tokens = list(request.stream())
    assert tokens == request.tokens and len(tokens) == 3 and request.finish_reason == "length"


def test_a_cancelled_request_frees_its_slot_at_the_next_step(batched):
    parts, engine = batched
    long = dict(max_new_tokens=25, min_new_tokens=25)   # prompt + 25 fits the demo model's seq_length
    runners = [engine.submit(_request(parts, *CASES[i], **long)) for i in range(4)]
    waiting = engine.submit(_request(parts, *CASES[4], max_new_tokens=4))
    firsts = [runner.events.get(timeout=120) for runner in runners]   # a first token: the request holds a slot
    assert None not in firsts and engine.status()["active"] == 4 and waiting.started is None
    steps = engine.status()["steps"]
    runners[0].cancel()
    assert waiting.wait(300) is not None and runners[0].done.is_set()
    assert runners[0].finish_reason == "cancelled" and len(runners[0].tokens) <= 2 + engine.status()["steps"] - steps
    assert waiting.started is not None and waiting.finish_reason in ("stop", "length")
    for runner in runners[1:]:
        runner.cancel()
        runner.wait(300)
    assert engine.status()["active"] == 0


def test_requests_that_cannot_run_are_refused_before_taking_a_slot(batched):
    parts, engine = batched
    seq_length = parts.model.config.text_config.seq_length
    with pytest.raises(SequenceTooLongError):
        engine.submit(Request([5] * seq_length, GenerationConfig()))
    with pytest.raises(SequenceTooLongError):
        engine.submit(_request(parts, *CASES[0], max_new_tokens=seq_length))
    full = BatchEngine(parts.model, max_queue=0)
    try:
        with pytest.raises(QueueFull, match="busy"):
            full.submit(_request(parts, *CASES[0], max_new_tokens=2))
        assert full.status()["refused"] == 1
    finally:
        full.shutdown(timeout=10)


def test_warmup_with_three_slots_then_answers_as_alone(alone):
    """warmup() compiles prefill groups of 1, 2 and 4 rows (4 > 3 slots: the rows wrap onto the slots) and
    the decode step; answers afterwards are still each request's own."""
    parts = _components(3)
    engine = BatchEngine(parts.model)
    try:
        assert engine.warmup() > 0
        expected = [_alone(alone, image, query, max_new_tokens=NEW_TOKENS) for image, query in CASES[:4]]
        requests = [engine.submit(_request(parts, image, query, max_new_tokens=NEW_TOKENS))
                    for image, query in CASES[:4]]
        assert [r.wait(300) for r in requests] == expected
    finally:
        engine.shutdown(cancel=True, timeout=30)
