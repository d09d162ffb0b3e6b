"""Stage 0 of the demo recipe: pretrain the vision side (ViT, ln_vision, Q-Former, query tokens) on the images.

VisualGLM-6B never trains its vision side from nothing: its ViT is EVA-CLIP, pretrained on billions of images,
and its Q-Former comes from BLIP-2, whose first stage teaches the queries to extract what the frozen ViT sees;
ChatGLM then learns to talk about the queries. The demo model follows the same plan at toy scale. A ViT this
small trained from scratch through the language loss learns colours in a few hundred steps but shapes only
after thousands (shape needs non-linear patch features; the answer tokens carry little gradient for them).
Trained alone, with direct signals, it learns them in minutes:

- a linear head on the mean of the Q-Former's query outputs classifies every image's shape kind, colour and
  object count (three softmax cross-entropies); reading through the Q-Former (not the ViT tokens) makes the
  queries carry those attributes, stars included, before the language stages start, so that the LoRA stage
  finds the star in the queries the base model never needed it from;
- a linear head on every patch token says what covers the patch (background or a shape kind) and how many
  objects have their centre in it: a dense signal for the patch features, which lets the queries count
  centres rather than guess the count from the covered area (which varies with the size);
- a curriculum: the first steps see only narrow, easy scenes (generate_data.EASY, the vision_easy split),
  then a blend whose share of easy scenes falls to none, then all of them. From the wide distribution alone
  (any background, size, style, rotation at once) a ViT this small learns colours but stays near chance on
  shapes for thousands of steps;
- many distinct images: besides the training splits' images, a pool of wide scenes (the vision_more split)
  drawn in memory, never written, so that the classifier does not learn the images by heart; and every image
  seen under a random one of the square's eight symmetries (rotations by quarter turns, mirror images), which
  change no label (shapes come at any rotation) and move the patch targets with the patches.

The heads are thrown away; stages 1 and 2 then train the rest with the project's finetune code, the ViT
frozen. The classifier sees the images of the training splits only (never a held-out one), stars included:
like CLIP, the vision side has seen the world; only the language model has never heard of a star (the LoRA
stage's new concept).
"""
import os
import signal

import numpy as np
from PIL import Image, ImageDraw

from visualglm.demo.generate_data import COLOURS, MAX_COUNT, SHAPES, draw_scene, make_scene, scene_rng, shape_polygon

HEADS = (("shape", list(SHAPES)), ("colour", list(COLOURS)), ("count", list(range(1, MAX_COUNT + 1))))
# each head's (start, end) columns of the classifier's logits
_ENDS = np.cumsum([len(classes) for _, classes in HEADS]).tolist()
HEAD_COLUMNS = tuple(zip([0] + _ENDS[:-1], _ENDS))
VISION_PARAMETERS = ("visual_encoder.", "ln_vision.", "qformer.", "query_tokens")
# Per-patch targets (the dense signal that EVA-CLIP's and BLIP-2's pretraining gives their patch features, here
# from the scene itself): what covers the patch (background or a shape kind), and whether an object's centre
# lies in it (the Q-Former then counts centres instead of guessing from the area, which varies with size).
PATCH_CLASSES = 1 + len(SHAPES)
MASK_SCALE = 8          # the coverage mask is drawn at MASK_SCALE pixels per patch
MIN_COVER = 0.2         # a patch belongs to a shape when the shape covers this share of it
CENTRE_CLASSES = 3      # objects whose centre lies in a patch: 0, 1, 2 or more (small touching copies share one)


def scene_targets(scene):
    """[shape index, colour index, count index] of a one-kind scene (see generate_data.make_scene)."""
    (group,) = scene["groups"]
    values = {"shape": group["shape"], "colour": group["colour"], "count": len(group["objects"])}
    return [classes.index(values[name]) for name, classes in HEADS]


def patch_targets(scene, grid):
    """(cover [grid * grid] in 0..len(SHAPES): 0 background, else 1 + the shape kind covering the patch;
    centre [grid * grid]: how many objects have their centre in the patch, at most CENTRE_CLASSES - 1), patches
    in the ViT's row-major order."""
    side = grid * MASK_SCALE
    cover = np.zeros(grid * grid, np.int32)
    centre = np.zeros(grid * grid, np.int32)
    kinds = list(SHAPES)
    for group in scene["groups"]:
        mask = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(mask)
        for cx, cy, s, angle in group["objects"]:
            if group["shape"] == "circle":
                r = s * side / 2
                draw.ellipse((cx * side - r, cy * side - r, cx * side + r, cy * side + r), fill=255)
            else:
                draw.polygon(shape_polygon(group["shape"], cx * side, cy * side, s * side, angle), fill=255)
            row, col = min(int(cy * grid), grid - 1), min(int(cx * grid), grid - 1)
            centre[row * grid + col] = min(centre[row * grid + col] + 1, CENTRE_CLASSES - 1)
        share = (np.asarray(mask, np.float32) / 255).reshape(grid, MASK_SCALE, grid, MASK_SCALE).mean((1, 3))
        cover[share.reshape(-1) >= MIN_COVER] = 1 + kinds.index(group["shape"])
    return cover, centre


def scene_arrays(job):
    """(image uint8 [S, S, 3], targets, cover, centre) of image `index` of `split` drawn from `seed`: the pixels
    of generate_data's PNG of it (lossless), without writing it. job: (seed, split, index, image size, grid)."""
    seed, split, index, size, grid = job
    scene = make_scene(scene_rng(seed, split, index), split, index)
    cover, centre = patch_targets(scene, grid)
    return np.asarray(draw_scene(scene, size), np.uint8), scene_targets(scene), cover, centre


def _default_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def vision_arrays(seed, counts, size, grid, workers=None):
    """(images uint8 [N, S, S, 3], targets [N, 3], cover [N, grid * grid], centre [N, grid * grid]) of the first
    counts[split] images of every split, in that order, drawn in parallel (one process per CPU core)."""
    import multiprocessing
    jobs = [(seed, split, index, size, grid) for split, count in counts.items() for index in range(count)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 256:
        # the workers are forked with the caller's SIGTERM handler (train_demo's sigterm_as_interrupt), which
        # would print a KeyboardInterrupt traceback from each when the pool terminates them at the end
        with multiprocessing.get_context("fork").Pool(workers, initializer=_default_sigterm) as pool:
            rows = pool.map(scene_arrays, jobs, chunksize=64)
    else:
        rows = [scene_arrays(job) for job in jobs]
    images, targets, cover, centre = (np.stack([row[i] for row in rows]) for i in range(4))
    return images, targets.astype(np.int32), cover.astype(np.int32), centre.astype(np.int32)


def _classifier(model, seed):
    """The model's vision side (ViT, ln_vision, Q-Former with its query tokens; `VisualGLMModel.vision_tokens`
    and `read_queries`), a linear head on the mean of the query outputs and one on every patch token; the heads
    drawn with numpy from seed."""
    import mindspore as ms
    from mindspore import nn

    hidden = model.query_tokens.shape[-1]
    vit_hidden = model.ln_vision.gamma.shape[-1]
    outputs = HEAD_COLUMNS[-1][1]
    rng = np.random.default_rng([seed, 11])

    def dense(name, width, out):
        cell = nn.Dense(width, out, weight_init=ms.Tensor(rng.normal(0, width ** -0.5, (out, width)), ms.float32),
                        bias_init="zeros")
        cell.update_parameters_name(name)
        return cell

    class VisionClassifier(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)   # the model's parameters keep their names (no "model." prefix)
            self.model = model
            self.head = dense("head.", hidden, outputs)
            self.patch_head = dense("patch_head.", vit_hidden, PATCH_CLASSES + CENTRE_CLASSES)
            self.ce = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

        def logits(self, pixels):
            return self.head(self.model.query_outputs(pixels).mean(1))

        def construct(self, pixels, targets, cover, centre):
            image = self.model.vision_tokens(pixels)
            logits = self.head(self.model.read_queries(image).mean(1))
            loss = 0.0
            for i, (start, end) in enumerate(HEAD_COLUMNS):
                loss = loss + self.ce(logits[:, start:end], targets[:, i])
            patches = self.patch_head(image[:, 1:]).reshape(-1, PATCH_CLASSES + CENTRE_CLASSES)
            loss = loss + self.ce(patches[:, :PATCH_CLASSES], cover.reshape(-1))
            return loss + self.ce(patches[:, PATCH_CLASSES:], centre.reshape(-1))

    return VisionClassifier()


def dihedral(images, cover, centre, transforms):
    """Images [N, S, S, C] and their patch targets [N, grid * grid], the n-th under symmetry transforms[n] of
    the square (0..7: transforms % 4 quarter turns, then a mirror image when >= 4). The grid divides the image
    into equal blocks, so turning the image turns its grid of patches the same way."""
    grid = int(round(cover.shape[1] ** 0.5))

    def turn(array, t):
        array = np.rot90(array, t % 4, axes=(0, 1))
        return array[:, ::-1] if t >= 4 else array

    images = np.stack([turn(image, t) for image, t in zip(images, transforms)])
    cover, centre = (np.stack([turn(target.reshape(grid, grid), t).reshape(-1) for target, t in zip(targets, transforms)])
                     for targets in (cover, centre))
    return images, cover, centre


def batch_rows(rng, step, batch_size, rows, easy_rows=0, easy_steps=0, blend_steps=0):
    """The rows of step `step`'s batch: the first `easy_steps` steps from the first `easy_rows` rows only (the
    vision_easy scenes); over the next `blend_steps` steps a share of easy rows falling linearly from all to
    none, the rest from all rows; then all rows."""
    if step < easy_steps:
        return rng.integers(0, easy_rows, batch_size)
    share = max(0.0, 1.0 - (step - easy_steps) / blend_steps) if blend_steps else 0.0
    easy = int(round(share * batch_size))
    return np.concatenate([rng.integers(0, easy_rows, easy), rng.integers(0, rows, batch_size - easy)])


def pretrain_vision(model, pixels, targets, cover, centre, steps, batch_size, learning_rate, weight_decay, seed,
                    warmup_steps=0, log_steps=250, easy_rows=0, easy_steps=0, blend_steps=0, preprocess=None,
                    report=None, report_steps=0, augment=False):
    """Train the model's vision side in place as the classifier above, on pixels [N, 3, S, S] (preprocessed by
    the model's image processor; or raw images with `preprocess`, which makes a batch of them the model's
    input), targets [N, 3] and the patch targets cover, centre [N, patches]: AdamW, a linear warmup and a cosine
    decay to a tenth (the finetune stages' AnnealingLR); batches as batch_rows draws them (the curriculum).
    `report(net)` is called every `report_steps` steps (held-out accuracy on the way). With `augment`, every
    image of a batch under a random symmetry of the square (dihedral; raw images only). Returns the losses of
    every step and the classifier (for `accuracy`)."""
    import time
    import mindspore as ms
    from mindspore import nn
    from visualglm.lr_schedule import AnnealingLR

    net = _classifier(model, seed)
    # what query_outputs reads, and the head: the GLM and llm_proj are not stage 0's to train
    params = [p for p in model.get_parameters() if p.name.startswith(VISION_PARAMETERS)] + list(net.head.get_parameters()) + \
        list(net.patch_head.get_parameters())
    for p in params:
        p.requires_grad = True
    schedule = AnnealingLR(learning_rate, warmup_steps, max(1, steps - warmup_steps), auto_warmup_steps=0)
    optimizer = nn.AdamWeightDecay(params, learning_rate=schedule, weight_decay=weight_decay)
    step = nn.TrainOneStepCell(net, optimizer)
    step.set_train(True)
    order = np.random.default_rng([seed, 13])
    losses, start = [], time.time()
    for i in range(steps):
        index = batch_rows(order, i, batch_size, len(pixels), easy_rows, easy_steps, blend_steps)
        batch, batch_cover, batch_centre = pixels[index], cover[index], centre[index]
        if augment:
            batch, batch_cover, batch_centre = dihedral(batch, batch_cover, batch_centre,
                                                        order.integers(0, 8, len(index)))
        batch = preprocess(batch) if preprocess else batch
        losses.append(float(step(*(ms.Tensor(a) for a in (batch, targets[index], batch_cover, batch_centre)))
                            .asnumpy()))
        if (i + 1) % log_steps == 0 or i + 1 == steps:
            rate = (i + 1) * batch_size / (time.time() - start)
            print(f"vision step {i + 1}/{steps} loss {np.mean(losses[-log_steps:]):.4f} {rate:.0f} images/s",
                  flush=True)
        if report and report_steps and (i + 1) % report_steps == 0 and i + 1 < steps:
            net.set_train(False)
            report(net)
            net.set_train(True)
    net.set_train(False)
    return losses, net


def accuracy(net, pixels, targets, batch_size=256, preprocess=None):
    """Per-head accuracy of the classifier on held-out images (raw with `preprocess`, as pretrain_vision)."""
    import mindspore as ms
    predictions = []
    for begin in range(0, len(pixels), batch_size):
        batch = pixels[begin:begin + batch_size]
        logits = net.logits(ms.Tensor(preprocess(batch) if preprocess else batch)).asnumpy()
        predictions.append(np.stack([logits[:, start:end].argmax(-1) for start, end in HEAD_COLUMNS], -1))
    predictions = np.concatenate(predictions)
    return {name: float((predictions[:, i] == targets[:, i]).mean()) for i, (name, _) in enumerate(HEADS)}


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(
        description="Stage 0 of the demo recipe (a library module: train_demo.py runs it).",
        epilog="Run the whole recipe with: python research/visualglm/demo/train_demo.py --help").parse_args()
    raise SystemExit("pretrain_vision.py is run by train_demo.py: python research/visualglm/demo/train_demo.py")
