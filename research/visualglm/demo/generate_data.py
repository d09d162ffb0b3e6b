"""Synthetic shape scenes with bilingual questions, answers and chats, for training and checking the demo model.

Each scene holds one kind of shape (circle, square, triangle; the star only where the LoRA and stage 0 need it)
in one of six colours, one to three copies (MAX_COUNT), drawn over the variations a user's pictures bring:

    background   light, grey, dark or saturated, plain or a gradient; never too close to the shape's colour
    size         from small (a seventh of the side) to filling most of it
    style        filled, filled with a darker border, or outline only
    layout       apart, touching or overlapping copies
    rotation     any angle

with a little pixel noise. Each scene records the variations it was drawn from (`scene["variation"]`), so
that the evaluation reports accuracy per variation. Every image gets eight single questions (a description,
the colour of its shape, the shape of its colour and a count, each in Chinese and in English) and, in each
language, a chat whose later turns carry the earlier ones as history: follow-ups that name no shape, other
questions and small talk, e.g.

    描述这张图片。                  -> 图中有两个绿色的三角形。
    What colour is the square?      -> It is yellow.   (or: What colour are the squares? -> They are yellow.)
    图中红色的物体是什么形状？      -> 圆形。
    How many triangles are there?   -> There are two triangles.
    (after a turn about the picture)  它们是什么颜色？ -> 绿色。   And how many? -> There are two triangles.
    你能做什么？                    -> 我可以描述图片，说出图中物体的形状、颜色和数量。

Splits (folders under --out, each with its images, `dataset.json` in the finetune format, a list of
{"img", "prompt", "label"} with img relative to the folder and the history inside the prompt exactly as the
chat builds it, and `meta.json`: for the same list the question type, language, whether it involves the new
concept, the question and history apart, and the scene's variations):

    train/          base scenes (no star)                     for the full-parameter stage
    heldout/        base scenes, other images                 base evaluation
    lora_train/     every other scene a star, else a base one for the LoRA stage
    lora_heldout/   scenes with a star, other images          new-concept evaluation
    vision_train/   all four kinds alike                      stage 0 only (the vision classifier)
    vision_easy/    all four kinds, narrow scenes (EASY)      the first steps of stage 0 only
    (vision_more)   all four kinds alike, never written       stage 0 only: drawn in memory (pretrain_vision)

Held-out chats follow a fixed plan (a question, two follow-ups about the other attributes, small talk), training
chats a random one. Everything is a function of --seed: image i of a split is drawn from its own generator
seeded with (seed, split, i), so the same seed gives byte-identical files, the splits share no image, and
another seed gives fresh images of the same distribution (evaluate.py --seed).

    python research/visualglm/demo/generate_data.py --out /tmp/demo_data --seed 0
"""
import argparse
import hashlib
import io
import json
import os
from collections import namedtuple

import numpy as np
from PIL import Image, ImageDraw

from visualglm.fileio import atomic_write

# name -> (Chinese, English singular, English plural)
SHAPES = {
    "circle": ("圆形", "circle", "circles"),
    "square": ("正方形", "square", "squares"),
    "triangle": ("三角形", "triangle", "triangles"),
    "star": ("星形", "star", "stars"),
}
BASE_SHAPES = ("circle", "square", "triangle")
NEW_SHAPE = "star"            # absent from the base splits: the concept the LoRA stage teaches
COLOURS = {                   # name -> (Chinese, RGB)
    "red": ("红色", (220, 35, 35)),
    "green": ("绿色", (40, 165, 60)),
    "blue": ("蓝色", (40, 80, 215)),
    "yellow": ("黄色", (240, 205, 35)),
    "purple": ("紫色", (130, 50, 170)),
    "orange": ("橙色", (245, 135, 20)),
}
ZH_NUMBERS = {1: "一", 2: "两", 3: "三"}
EN_NUMBERS = {0: "no", 1: "one", 2: "two", 3: "three"}
SPLITS = {"train": 0, "heldout": 1, "lora_train": 2, "lora_heldout": 3, "vision_train": 4, "vision_easy": 5,
          "vision_more": 6}
QUESTION_TYPES = ("description", "colour", "shape", "count", "follow-up", "small talk")
LANGUAGES = ("zh", "en")
# the splits written to disk (vision_more is drawn in memory by stage 0: its size is train_demo.VISION's)
DEFAULT_COUNTS = {"train": 5000, "heldout": 300, "lora_train": 1200, "lora_heldout": 150, "vision_train": 4000,
                  "vision_easy": 3000}
IMAGE_SIZE = 96               # the demo model's input size: dataset images are stored at it (no resize)
MAX_COUNT = 3
SUPERSAMPLE = 4               # shapes are drawn at 4x and downsampled: anti-aliased edges

# ------------------------------------------------------------------------------------------------ scenes
# The variations a scene is drawn from (each recorded in the scene, so that the evaluation can report them):
BACKGROUND_KINDS = {"light": 0.35, "grey": 0.25, "dark": 0.2, "saturated": 0.2}
STYLES = {"filled": 0.5, "outlined": 0.2, "outline_only": 0.3}   # outlined: filled with a darker border
LAYOUTS = {"apart": 0.6, "touching": 0.2, "overlapping": 0.2}       # of scenes with two or three objects
# An object's size (fraction of the image side): the scene's scale is log-uniform in this range, each object
# within 15 % of it; the upper end shrinks with the count so that the objects fit.
SIZE_RANGE = {1: (0.14, 0.85), 2: (0.14, 0.5), 3: (0.14, 0.42)}
SIZE_CLASSES = ((0.2, "small"), (0.45, "medium"), (1.0, "large"))   # (upper bound, name) of the scene's scale
MIN_CONTRAST = 150.0          # RGB distance between a shape's colour and the background behind it
MIN_HUE_GAP = 45.0            # degrees between a shape's hue and a saturated background's
MAX_ROTATION = 180.0          # degrees either way
GRADIENT_SHARE = 0.2          # of backgrounds, a vertical gradient into a second colour of the same kind
WIDE = {"backgrounds": BACKGROUND_KINDS, "styles": STYLES, "layouts": LAYOUTS, "sizes": SIZE_RANGE,
        "max_rotation": MAX_ROTATION}
# vision_easy, the first steps of stage 0 only: the narrow scenes a small ViT learns shapes from quickly (light
# backgrounds, mid sizes, nearly upright, filled, apart); from all variations at once it learns colours but
# stays at chance on shapes for thousands of steps (each variation alone costs it little).
EASY = {"backgrounds": {"light": 1.0}, "styles": {"filled": 0.7, "outlined": 0.3}, "layouts": {"apart": 1.0},
        "sizes": {count: (0.2, 0.34) for count in SIZE_RANGE}, "max_rotation": 20.0}


def _pick(rng, weights):
    names = list(weights)
    return names[int(rng.choice(len(names), p=np.array([weights[n] for n in names]) / sum(weights.values())))]


def _hsv_rgb(h, s, v):
    import colorsys
    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v)]


def _hue(rgb):
    import colorsys
    h, s, _ = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return 360.0 * h, s


def _background_colour(rng, kind):
    if kind == "light":
        return _hsv_rgb(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.85, 1.0))
    if kind == "grey":
        return [int(rng.integers(60, 220))] * 3
    if kind == "dark":
        return _hsv_rgb(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.04, 0.3))
    return _hsv_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))


def contrasts(colour, background):
    """Whether a shape of `colour` (RGB) is told apart from `background` (RGB) by colour: far enough in RGB and,
    on a saturated background, in hue (orange on red would otherwise pass for red)."""
    if float(np.linalg.norm(np.subtract(colour, background, dtype=np.float64))) < MIN_CONTRAST:
        return False
    hue, sat = _hue(background)
    if sat < 0.35:
        return True
    gap = abs(hue - _hue(colour)[0]) % 360
    return min(gap, 360 - gap) >= MIN_HUE_GAP


def _backdrop(rng, colour, kinds):
    """(kind, top colour, bottom colour or None): a background of a random kind (`kinds`: weights) that the
    shape colour contrasts with; GRADIENT_SHARE of them a vertical gradient into a second such colour of the
    same kind (a light-to-dark ramp would leave no colour that contrasts with all of it)."""
    kind = _pick(rng, kinds)
    top = _contrasting_background(rng, kind, colour)
    bottom = _contrasting_background(rng, kind, colour) if rng.random() < GRADIENT_SHARE else None
    return kind, top, bottom


def _contrasting_background(rng, kind, colour):
    """A background colour of `kind` that `colour` contrasts with (rejection sampling)."""
    while True:
        background = _background_colour(rng, kind)
        if contrasts(colour, background):
            return background


def _kinds_for(rng, split, index):
    """The shape kind of a scene (a list of one: the scene format allows several kinds, but a model this small
    does not learn which colour goes with which shape in the time budget). The LoRA splits draw stars: every
    other scene of lora_train (the others a base shape, so that the LoRA stage does not unlearn them) and
    every scene of lora_heldout; the vision splits (stage 0 only) draw all four kinds alike."""
    if split == "lora_heldout" or (split == "lora_train" and index % 2 == 0):
        return [NEW_SHAPE]
    return [str(rng.choice(list(SHAPES) if split.startswith("vision") else BASE_SHAPES))]


# the closest two objects' centres may come, as a share of the sum of their radii (apart: plus 0.02 of the side)
MIN_GAP = {"apart": 1.1, "touching": 0.95, "overlapping": 0.6}


def _place(rng, sizes, layout, max_rotation):
    """(cx, cy, size, angle) of objects of the given sizes (fractions of the side), inside the image: apart (no
    contact), touching (each new object's edge at another's) or overlapping (up to about a third of the
    smaller one covered, never its centre); any rotation. None when the rejection sampling fails."""
    placed = []
    for size in sizes:
        margin = size / 2 + 0.01
        for _attempt in range(300):
            if placed and layout != "apart":   # next to an object already placed
                x, y, s = placed[int(rng.integers(len(placed)))][:3]
                reach = (size + s) / 2 * (rng.uniform(0.97, 1.05) if layout == "touching" else rng.uniform(0.62, 0.85))
                theta = rng.uniform(0, 2 * np.pi)
                cx, cy = x + reach * np.cos(theta), y + reach * np.sin(theta)
                if not (margin <= cx <= 1 - margin and margin <= cy <= 1 - margin):
                    continue
            else:
                cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, 2))
            extra = 0.02 if layout == "apart" else 0.0
            if all(np.hypot(cx - px, cy - py) >= (size + ps) / 2 * MIN_GAP[layout] + extra for px, py, ps, _ in placed):
                placed.append((float(cx), float(cy), float(size), float(rng.uniform(-max_rotation, max_rotation))))
                break
        else:
            return None
    return placed


def make_scene(rng, split="train", index=0):
    """A scene: backdrop, style, and a list of groups {shape, colour, objects: [(cx, cy, size, angle)]} with
    coordinates as fractions of the image side, plus the variations it was drawn from (`variation`). Every
    split draws from WIDE but vision_easy, from EASY."""
    ranges = EASY if split == "vision_easy" else WIDE
    kinds = _kinds_for(rng, split, index)
    colours = list(rng.permutation(list(COLOURS))[:len(kinds)])
    counts = [int(rng.integers(1, MAX_COUNT + 1)) for _ in kinds]
    total = sum(counts)
    layout = _pick(rng, ranges["layouts"]) if total > 1 else "single"
    low, high = ranges["sizes"][total]
    while True:
        scale = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        sizes = [float(np.clip(scale * rng.uniform(0.85, 1.15), low, high)) for _ in range(total)]
        placed = _place(rng, sizes, layout, ranges["max_rotation"])
        if placed is not None:
            break
    groups, start = [], 0
    for kind, colour, count in zip(kinds, colours, counts):
        groups.append({"shape": kind, "colour": colour, "objects": placed[start:start + count]})
        start += count
    style = _pick(rng, ranges["styles"])
    if layout == "overlapping" and style == "filled":
        style = "outlined"   # one colour: without a border, overlapping copies would merge into one blob
    background_kind, background, gradient = _backdrop(rng, COLOURS[colours[0]][1], ranges["backgrounds"])
    size_class = next(name for bound, name in SIZE_CLASSES if scale < bound)
    return {"background": background, "gradient": gradient, "groups": groups, "style": style,
            "jitter": rng.integers(-14, 15, (len(groups), 3)).tolist(),
            "noise_seed": int(rng.integers(2 ** 31)), "noise": float(rng.uniform(2.0, 7.0)),
            "variation": {"background": background_kind, "size": size_class, "style": style, "layout": layout,
                          "rotation": "upright" if all(abs(o[3]) <= 20 for o in placed) else "rotated",
                          "count": total}}


def _star_points(cx, cy, radius, angle):
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.42
        theta = np.deg2rad(angle) - np.pi / 2 + k * np.pi / 5
        points.append((cx + r * np.cos(theta), cy + r * np.sin(theta)))
    return points


def shape_polygon(shape, cx, cy, size, angle):
    """The outline of a non-circle shape (pixel coordinates), rotated by angle degrees."""
    half = size / 2
    if shape == "square":
        side = half * 0.9   # a square's area is close to the circle's of the same size
        corners = [(-side, -side), (side, -side), (side, side), (-side, side)]
    elif shape == "triangle":
        corners = [(0, -half), (half * 0.98, half * 0.72), (-half * 0.98, half * 0.72)]
    elif shape == "star":
        return _star_points(cx, cy, half * 1.05, angle)
    else:
        raise ValueError(f"unknown shape {shape}")
    theta = np.deg2rad(angle)
    cos, sin = np.cos(theta), np.sin(theta)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners]


def _line_width(size, big):
    """An outline's width in supersampled pixels: thin for small shapes, never under about 2 output pixels."""
    return max(1, round(float(np.clip(0.08 * size, 0.022, 0.04)) * big))


def draw_scene(scene, size=IMAGE_SIZE):
    """The scene as an RGB PIL image of size x size pixels."""
    big = size * SUPERSAMPLE
    top = np.array(scene["background"], np.float32)
    bottom = np.array(scene["gradient"] or scene["background"], np.float32)
    ramp = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
    canvas = (top * (1 - ramp) + bottom * ramp) * np.ones((1, big, 1), np.float32)
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))   # [H, W, 3] uint8: RGB
    draw = ImageDraw.Draw(img)
    style = scene.get("style", "filled")
    for group, jitter in zip(scene["groups"], scene["jitter"]):
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[group["colour"]][1], jitter))
        if style == "outline_only":
            fill, outline = None, colour
        else:
            fill, outline = colour, (tuple(int(c * 0.55) for c in colour) if style == "outlined" else None)
        for cx, cy, s, angle in group["objects"]:
            width = _line_width(s, big) if outline else 0
            cx, cy, s = cx * big, cy * big, s * big
            if group["shape"] == "circle":
                r = s / 2
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
            else:
                points = shape_polygon(group["shape"], cx, cy, s, angle)
                if fill is not None:
                    draw.polygon(points, fill=fill)
                if outline is not None:   # a closed line of even width (polygon's own outline is uneven)
                    draw.line(points + points[:2], fill=outline, width=width, joint="curve")
    img = img.resize((size, size), Image.LANCZOS)
    noise = np.random.default_rng(scene["noise_seed"]).normal(0, scene["noise"], (size, size, 3))
    pixels = np.clip(np.asarray(img, np.float32) + noise, 0, 255)
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ text
# One turn of a chat: its type (QUESTION_TYPES), language, the question, its answer, whether the answer is about
# the new concept, and the turns before it [(question, answer)].
Record = namedtuple("Record", "type lang question label new_concept history")

DESCRIBE = {"zh": ("描述这张图片。", "这张图片里有什么？", "图中有什么？"),
            "en": ("Describe the image.", "What is in the picture?", "What do you see?")}
# Follow-ups name no shape: they ask about the one in the picture, which the chat so far is about.
FOLLOW_UPS = {"zh": {"colour": (("它是什么颜色？", "它们是什么颜色？"), ("是什么颜色？", "是什么颜色？")),
                     "shape": (("它是什么形状？", "它们是什么形状？"), ("是什么形状？", "是什么形状？")),
                     "count": (("有几个？", "有几个？"), ("那有几个呢？", "那有几个呢？"), ("一共有几个？", "一共有几个？"))},
              "en": {"colour": (("What colour is it?", "What colour are they?"),
                                ("What color is it?", "What color are they?")),
                     "shape": (("What shape is it?", "What shape are they?"),),
                     "count": (("And how many?", "And how many?"), ("How many are there?", "How many are there?"),
                               ("How many of them?", "How many of them?"))}}
# Turns about nothing in the picture: (questions, answer).
SMALL_TALK = {"zh": ((("你好", "你好！"), "你好！我可以回答关于图中形状、颜色和数量的问题。"),
                     (("你能做什么？", "你会做什么？"), "我可以描述图片，说出图中物体的形状、颜色和数量。"),
                     (("谢谢", "谢谢！"), "不客气！")),
              "en": ((("Hello", "Hi!"), "Hello! Ask me about the shapes, colours and counts in the image."),
                     (("What can you do?",), "I can describe the image and tell you the shape, colour and count of its "
                                              "objects."),
                     (("Thank you", "Thanks!"), "You're welcome!"))}
# Chats in the training splits: how many turns (besides the single questions every image gets) and what the
# turns after the first are.
CHAT_TURNS = {2: 0.35, 3: 0.25, 4: 0.2, 5: 0.2}
LATER_TURN = {"follow-up": 0.45, "question": 0.4, "small talk": 0.15}


def _en_count(shape, count):
    return f"{EN_NUMBERS[count]} {SHAPES[shape][1] if count == 1 else SHAPES[shape][2]}"


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def describe(scene):
    """(Chinese, English) description; groups in the fixed shape order circle, square, triangle, star."""
    order = list(SHAPES)
    groups = sorted(scene["groups"], key=lambda g: order.index(g["shape"]))
    zh = "和".join(f"{ZH_NUMBERS[len(g['objects'])]}个{COLOURS[g['colour']][0]}的{SHAPES[g['shape']][0]}"
                  for g in groups)
    en_items = [f"{_en_count(g['shape'], len(g['objects'])).replace(' ', ' ' + g['colour'] + ' ', 1)}"
                for g in groups]
    verb = "is" if len(groups[0]["objects"]) == 1 else "are"
    return f"图中有{zh}。", f"There {verb} {' and '.join(en_items)}."


def _answer(kind, group, lang):
    """The answer about `group` to a question of kind colour, shape or count (asked directly or as a follow-up)."""
    shape, colour, count = group["shape"], group["colour"], len(group["objects"])
    if kind == "colour":
        return f"{COLOURS[colour][0]}。" if lang == "zh" else f"{'They are' if count > 1 else 'It is'} {colour}."
    if kind == "shape":
        if lang == "zh":
            return f"{SHAPES[shape][0]}。"
        return f"They are {SHAPES[shape][2]}." if count > 1 else f"It is a {SHAPES[shape][1]}."
    return count_answer(shape, count, lang)


def count_answer(shape, count, lang):
    if lang == "zh":
        return f"图中没有{SHAPES[shape][0]}。" if count == 0 else f"图中有{ZH_NUMBERS[count]}个{SHAPES[shape][0]}。"
    return f"There {'is' if count == 1 else 'are'} {_en_count(shape, count)}."


def _question(kind, scene, focus, rng, lang, split, absent=True):
    """A direct question of `kind` about `focus` (a group of the scene): (question, answer, about the new concept).
    A count question sometimes asks for a shape that is absent (answer: none), never in lora_heldout, whose
    count questions all measure the star, nor with absent=False (in a chat, whose follow-ups need a shape that is
    there); lora_train asks for absent stars too (the LoRA learns "no stars")."""
    shape, colour, count = focus["shape"], focus["colour"], len(focus["objects"])
    plural = count > 1
    if kind == "description":
        return _choice(rng, DESCRIBE[lang]), describe(scene)[lang == "en"], any(
            g["shape"] == NEW_SHAPE for g in scene["groups"])
    if kind == "colour":
        zh_shape, en_one, en_many = SHAPES[shape]
        word = _choice(rng, ("colour", "color"))
        question = (_choice(rng, (f"图中的{zh_shape}是什么颜色？", f"{zh_shape}是什么颜色的？")) if lang == "zh" else
                    f"What {word} {'are' if plural else 'is'} the {en_many if plural else en_one}?")
        return question, _answer("colour", focus, lang), shape == NEW_SHAPE
    if kind == "shape":
        zh_colour = COLOURS[colour][0]
        question = (_choice(rng, (f"图中{zh_colour}的物体是什么形状？", f"{zh_colour}的物体是什么形状？")) if lang == "zh"
                    else f"What shape {'are' if plural else 'is'} the {colour} {'objects' if plural else 'object'}?")
        return question, _answer("shape", focus, lang), shape == NEW_SHAPE
    present = {g["shape"]: len(g["objects"]) for g in scene["groups"]}
    asked = shape
    if absent and split != "lora_heldout" and rng.random() < 0.25:
        known = SHAPES if split == "lora_train" else BASE_SHAPES
        asked = _choice(rng, [s for s in known if s not in present])
    question = (_choice(rng, (f"图中有几个{SHAPES[asked][0]}？", f"有几个{SHAPES[asked][0]}？")) if lang == "zh" else
                _choice(rng, (f"How many {SHAPES[asked][2]} are there?", f"How many {SHAPES[asked][2]}?")))
    return question, count_answer(asked, present.get(asked, 0), lang), asked == NEW_SHAPE


def _follow_up(kind, focus, rng, lang):
    question = _choice(rng, FOLLOW_UPS[lang][kind])[len(focus["objects"]) > 1]
    return question, _answer(kind, focus, lang), focus["shape"] == NEW_SHAPE


def _small_talk(rng, lang, which=None):
    questions, answer = SMALL_TALK[lang][int(rng.integers(len(SMALL_TALK[lang]))) if which is None else which]
    return _choice(rng, questions), answer, False


def _focus(scene, rng, split):
    """The group the questions ask about: in the LoRA splits the star when the scene has one."""
    groups = scene["groups"]
    star = [g for g in groups if g["shape"] == NEW_SHAPE]
    return star[0] if star and split.startswith("lora") else groups[int(rng.integers(len(groups)))]


def _chat(scene, focus, rng, lang, split):
    """A chat of 2-5 turns (CHAT_TURNS) as records: the first turn a question about the picture (sometimes small
    talk), each later one a follow-up, another question or small talk (LATER_TURN)."""
    turns, records = [], []
    for index in range(_pick(rng, CHAT_TURNS)):
        step = "small talk" if index == 0 and rng.random() < 0.1 else (
            "question" if index == 0 else _pick(rng, LATER_TURN))
        if step == "follow-up":
            kind = _choice(rng, ("colour", "shape", "count"))
            question, label, concept = _follow_up(kind, focus, rng, lang)
            qtype = "follow-up"
        elif step == "question":
            qtype = _choice(rng, ("description", "colour", "shape", "count"))
            question, label, concept = _question(qtype, scene, focus, rng, lang, split, absent=False)
        else:
            question, label, concept = _small_talk(rng, lang)
            qtype = "small talk"
        if index > 0:   # the first turn of a chat is one of the single questions every image has
            records.append(Record(qtype, lang, question, label, concept, tuple(turns)))
        turns.append((question, label))
    return records


def _held_out_chat(scene, focus, rng, lang, split):
    """The held-out chat of an image: a question about the picture, then two follow-ups about the other two
    attributes, then small talk; the three later turns are records (with the true answers as history)."""
    first = _choice(rng, ("description", "colour", "shape", "count"))
    question, label, _ = _question(first, scene, focus, rng, lang, split, absent=False)
    turns, records = [(question, label)], []
    kinds = [k for k in ("colour", "shape", "count") if k != first]
    for kind in [kinds[i] for i in rng.permutation(len(kinds))][:2]:
        question, label, concept = _follow_up(kind, focus, rng, lang)
        records.append(Record("follow-up", lang, question, label, concept, tuple(turns)))
        turns.append((question, label))
    question, label, concept = _small_talk(rng, lang)
    records.append(Record("small talk", lang, question, label, concept, tuple(turns)))
    return records


def questions(scene, rng, split="train"):
    """The records of a scene: a description, the colour of its shape, the shape of its colour and a count, each
    as a single question in Chinese and in English; then in each language a chat whose later turns carry the
    turns before them as history (training splits: a random chat; held-out splits: a fixed plan)."""
    focus = _focus(scene, rng, split)
    records = [Record(qtype, lang, *_question(qtype, scene, focus, rng, lang, split), ())
               for qtype in ("description", "colour", "shape", "count") for lang in LANGUAGES]
    chat = _held_out_chat if split.endswith("heldout") else _chat
    for lang in LANGUAGES:
        records += chat(scene, focus, rng, lang, split)
    return records


def prompt_with_history(question, history):
    """The dataset.json prompt of a turn: the finetune data builds `</img>问：{prompt}\n答：` around it, which this
    makes equal to the chat prompt of `question` after `history` (processing.build_prompt)."""
    from visualglm.processing import build_prompt
    empty = build_prompt("")[1]            # "</img>问：\n答："
    before = empty.index("\n")            # the length of "</img>问：", the text before the query
    post = build_prompt(question, history)[1]
    return post[before:len(post) - (len(empty) - before)]


# ------------------------------------------------------------------------------------------------ files
def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def scene_rng(seed, split, index):
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def make_sample(seed, split, index, size=IMAGE_SIZE):
    """(scene, PNG bytes, question records) of image `index` of `split`: a pure function of its arguments."""
    rng = scene_rng(seed, split, index)
    scene = make_scene(rng, split, index)
    records = questions(scene, rng, split)
    return scene, png_bytes(draw_scene(scene, size)), records


def write_split(out, split, count, seed, size=IMAGE_SIZE):
    """Write `count` images of a split with dataset.json and meta.json; returns the dataset entries."""
    folder = os.path.join(out, split)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    entries, meta = [], []
    for index in range(count):
        scene, data, records = make_sample(seed, split, index, size)
        name = f"images/{split}_{index:05d}.png"
        with atomic_write(os.path.join(folder, name)) as tmp, open(tmp, "wb") as f:
            f.write(data)
        for record in records:
            entries.append({"img": name, "prompt": prompt_with_history(record.question, record.history),
                            "label": record.label})
            meta.append({"type": record.type, "lang": record.lang, "new_concept": bool(record.new_concept),
                         "image_index": index, "has_star": any(g["shape"] == NEW_SHAPE for g in scene["groups"]),
                         "question": record.question,
                         "history": [list(turn) for turn in record.history], "variation": scene["variation"]})
    if split.endswith("train"):   # a fixed shuffle, so no image's questions sit together
        order = np.random.default_rng([int(seed), SPLITS[split], 1 << 20]).permutation(len(entries))
        entries, meta = [entries[i] for i in order], [meta[i] for i in order]
    _write_json(os.path.join(folder, "dataset.json"), entries)
    _write_json(os.path.join(folder, "meta.json"), meta)
    return entries


def _write_json(path, data):
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=0)
        f.write("\n")


def generate(out, seed=0, counts=None, size=IMAGE_SIZE, splits=tuple(DEFAULT_COUNTS)):
    """The given splits (default all) under `out`; returns {split: number of entries}. Checks that no image
    repeats."""
    counts = dict(DEFAULT_COUNTS, **(counts or {}))
    written, hashes = {}, {}
    for split in splits:
        written[split] = len(write_split(out, split, counts[split], seed, size))
        folder = os.path.join(out, split, "images")
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            if digest in hashes:
                raise RuntimeError(f"{split}/{name} repeats {hashes[digest]}")
            hashes[digest] = f"{split}/{name}"
    return written


def corpus_lines(seed=0, counts=None, splits=tuple(DEFAULT_COUNTS)):
    """Every question and answer text of the splits, in order, repeats kept (the tokenizer's training text),
    without drawing images."""
    counts = dict(DEFAULT_COUNTS, **(counts or {}))
    lines = []
    for split in splits:
        for index in range(counts[split]):
            rng = scene_rng(seed, split, index)
            scene = make_scene(rng, split, index)
            for record in questions(scene, rng, split):
                lines += [record.question, record.label]
    return lines


def chinese_words():
    """The Chinese shape and colour names (word boundaries for the tokenizer)."""
    return tuple(v[0] for v in SHAPES.values()) + tuple(v[0] for v in COLOURS.values())


# Scenes of the example images in examples/ (drawn at 224 px, the model resizes them).
EXAMPLE_SCENES = {
    "demo_blue_square.png": {"background": [250, 250, 250], "gradient": None, "style": "filled",
                             "groups": [{"shape": "square", "colour": "blue", "objects": [[0.5, 0.5, 0.28, 8.0]]}],
                             "jitter": [[0, 0, 0]], "noise_seed": 1, "noise": 3.0},
    "demo_triangles.png": {"background": [246, 236, 212], "gradient": None, "style": "filled",
                           "groups": [{"shape": "triangle", "colour": "green",
                                       "objects": [[0.25, 0.28, 0.28, 0.0], [0.72, 0.3, 0.27, -6.0],
                                                   [0.48, 0.74, 0.3, 5.0]]}],
                           "jitter": [[0, 0, 0]], "noise_seed": 2, "noise": 3.0},
    "demo_star.png": {"background": [222, 228, 250], "gradient": None, "style": "filled",
                      "groups": [{"shape": "star", "colour": "yellow", "objects": [[0.5, 0.5, 0.33, 0.0]]}],
                      "jitter": [[0, 0, 0]], "noise_seed": 3, "noise": 3.0},
}


def write_examples(folder, size=224):
    """Draw EXAMPLE_SCENES into `folder`; returns the paths."""
    paths = []
    os.makedirs(folder, exist_ok=True)
    for name, scene in EXAMPLE_SCENES.items():
        path = os.path.join(folder, name)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            f.write(png_bytes(draw_scene(scene, size)))
        paths.append(path)
    return paths


def main(argv=None):
    from visualglm.cli import non_negative_int, positive_int
    from visualglm.fileio import check_output_dir
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="output folder (train/, heldout/, lora_train/, lora_heldout/)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    for split, count in DEFAULT_COUNTS.items():
        parser.add_argument(f"--{split}", type=non_negative_int, default=count, help=f"images in {split} (default {count})")
    parser.add_argument("--splits", nargs="+", choices=tuple(DEFAULT_COUNTS), default=list(DEFAULT_COUNTS),
                        help="write only these splits (default: all), e.g. --splits lora_train for the star LoRA")
    parser.add_argument("--image_size", type=positive_int, default=IMAGE_SIZE, help=f"pixels (default {IMAGE_SIZE})")
    parser.add_argument("--examples", default=None, help="also draw the example images into this folder")
    args = parser.parse_args(argv)
    check_output_dir(args.out, "--out")
    if args.examples:
        check_output_dir(args.examples, "--examples")
    counts = {split: getattr(args, split) for split in DEFAULT_COUNTS}
    written = generate(args.out, args.seed, counts, args.image_size, args.splits)
    for split, n in written.items():
        print(f"{split}: {counts[split]} images, {n} question/answer pairs -> {os.path.join(args.out, split)}")
    if args.examples:
        for path in write_examples(args.examples):
            print(f"wrote {path}")


if __name__ == "__main__":
    from visualglm.cli import run_main
    run_main(main)
