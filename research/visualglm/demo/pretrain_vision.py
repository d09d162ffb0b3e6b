"""Stage 0 of the demo recipe: pretrain the vision side (ViT, ln_vision, Q-Former, query tokens) on the images.

VisualGLM-6B never trains its vision side from nothing: its ViT is EVA-CLIP, pretrained on billions of images,
and its Q-Former comes from BLIP-2, whose first stage teaches the queries to extract what the frozen ViT sees;
ChatGLM then learns to talk about the queries. The demo model follows the same plan at toy scale. A ViT this
small trained from scratch through the language loss learns colours in a few hundred steps but shapes only
after thousands (shape needs non-linear patch features; the answer tokens carry little gradient for them),
far more than the 30-minute budget allows at the full model's step cost. Trained alone, with a direct signal,
it learns them in minutes: a linear head on the mean of the Q-Former's query outputs classifies every image's
shape kind, colour and object count (three softmax cross-entropies). Reading through the Q-Former (not the
ViT tokens) makes the queries carry those attributes, stars included, before the language stages start, so
that the LoRA stage finds the star in the queries the base model never needed it from. The head is thrown
away; stages 1 and 2 then train the rest with the project's finetune code, the ViT frozen.

The classifier sees the images of the training splits only (never a held-out one), stars included: like CLIP,
the vision side has seen the world; only the language model has never heard of a star (the LoRA stage's
new concept).
"""
import numpy as np

from visualglm.demo.generate_data import COLOURS, MAX_COUNT, SHAPES

HEADS = (("shape", list(SHAPES)), ("colour", list(COLOURS)), ("count", list(range(1, MAX_COUNT + 1))))
# each head's (start, end) columns of the classifier's logits
_ENDS = np.cumsum([len(classes) for _, classes in HEADS]).tolist()
HEAD_COLUMNS = tuple(zip([0] + _ENDS[:-1], _ENDS))
VISION_PARAMETERS = ("visual_encoder.", "ln_vision.", "qformer.", "query_tokens")


def scene_targets(scene):
    """[shape index, colour index, count index] of a one-kind scene (see generate_data.make_scene)."""
    (group,) = scene["groups"]
    values = {"shape": group["shape"], "colour": group["colour"], "count": len(group["objects"])}
    return [classes.index(values[name]) for name, classes in HEADS]


def _classifier(model, seed):
    """The model's vision side (ViT, ln_vision, Q-Former with its query tokens; `VisualGLMModel.query_outputs`)
    and a linear head on the mean of the query outputs; the head drawn with numpy from seed."""
    import mindspore as ms
    from mindspore import nn

    hidden = model.query_tokens.shape[-1]
    outputs = HEAD_COLUMNS[-1][1]
    rng = np.random.default_rng([seed, 11])

    class VisionClassifier(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)   # the model's parameters keep their names (no "model." prefix)
            self.model = model
            self.head = nn.Dense(hidden, outputs,
                                 weight_init=ms.Tensor(rng.normal(0, hidden ** -0.5, (outputs, hidden)), ms.float32),
                                 bias_init="zeros")
            self.head.update_parameters_name("head.")
            self.ce = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

        def logits(self, pixels):
            return self.head(self.model.query_outputs(pixels).mean(1))

        def construct(self, pixels, targets):
            logits = self.logits(pixels)
            loss = 0.0
            for i, (start, end) in enumerate(HEAD_COLUMNS):
                loss = loss + self.ce(logits[:, start:end], targets[:, i])
            return loss

    return VisionClassifier()


def pretrain_vision(model, pixels, targets, steps, batch_size, learning_rate, weight_decay, seed, warmup_steps=0,
                    log_steps=250):
    """Train the model's vision side in place as the classifier above, on pixels [N, 3, S, S] (preprocessed by
    the model's image processor) and targets [N, 3]: AdamW, a linear warmup and a cosine decay to a tenth
    (the finetune stages' AnnealingLR). Returns the losses of every step and the classifier (for `accuracy`)."""
    import time
    import mindspore as ms
    from mindspore import nn
    from visualglm.lr_schedule import AnnealingLR

    net = _classifier(model, seed)
    # what query_outputs reads, and the head: the GLM and llm_proj are not stage 0's to train
    params = [p for p in model.get_parameters() if p.name.startswith(VISION_PARAMETERS)] + list(net.head.get_parameters())
    for p in params:
        p.requires_grad = True
    schedule = AnnealingLR(learning_rate, warmup_steps, max(1, steps - warmup_steps), auto_warmup_steps=0)
    optimizer = nn.AdamWeightDecay(params, learning_rate=schedule, weight_decay=weight_decay)
    step = nn.TrainOneStepCell(net, optimizer)
    step.set_train(True)
    order = np.random.default_rng([seed, 13])
    losses, start = [], time.time()
    for i in range(steps):
        index = order.integers(0, len(pixels), batch_size)
        losses.append(float(step(ms.Tensor(pixels[index]), ms.Tensor(targets[index])).asnumpy()))
        if (i + 1) % log_steps == 0 or i + 1 == steps:
            rate = (i + 1) * batch_size / (time.time() - start)
            print(f"vision step {i + 1}/{steps} loss {np.mean(losses[-log_steps:]):.4f} {rate:.0f} images/s",
                  flush=True)
    net.set_train(False)
    return losses, net


def accuracy(net, pixels, targets, batch_size=256):
    """Per-head accuracy of the classifier on held-out images."""
    import mindspore as ms
    predictions = []
    for begin in range(0, len(pixels), batch_size):
        logits = net.logits(ms.Tensor(pixels[begin:begin + batch_size])).asnumpy()
        predictions.append(np.stack([logits[:, start:end].argmax(-1) for start, end in HEAD_COLUMNS], -1))
    predictions = np.concatenate(predictions)
    return {name: float((predictions[:, i] == targets[:, i]).mean()) for i, (name, _) in enumerate(HEADS)}


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(
        description="Stage 0 of the demo recipe (a library module: train_demo.py runs it).",
        epilog="Run the whole recipe with: python research/visualglm/demo/train_demo.py --help").parse_args()
    raise SystemExit("pretrain_vision.py is run by train_demo.py: python research/visualglm/demo/train_demo.py")
