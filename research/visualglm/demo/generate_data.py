"""Synthetic shape scenes with bilingual questions and answers, for training and checking the demo model.

Each scene holds one kind of shape (circle, square, triangle; the star only in the LoRA splits and vision_train)
in one colour, one to three copies of random size, position and rotation, on a light plain or gradient
background, sometimes outlined, with a little pixel noise. Every image gets eight question/answer pairs: a
description, the colour of a shape, the shape of a colour and a count, each in Chinese and in English, e.g.

    描述这张图片。              -> 图中有两个绿色的三角形。
    What colour is the square?  -> It is yellow.       (or: What colour are the squares? -> They are yellow.)
    图中红色的物体是什么形状？  -> 圆形。
    How many triangles are there? -> There are two triangles.

Splits (folders under --out, each with its images, `dataset.json` in the finetune format, a list of
{"img", "prompt", "label"} with img relative to the folder, and `meta.json`, the same list's question type,
language and whether it involves the new concept):

    train/          base scenes (no star)                     for the full-parameter stage
    heldout/        base scenes, other images                 base evaluation
    lora_train/     every other scene a star, else a base one for the LoRA stage
    lora_heldout/   scenes with a star, other images          new-concept evaluation
    vision_train/   star scenes                               stage 0 only (the vision classifier), so that it
                                                              sees the four shape kinds about equally often

Everything is a function of --seed: image i of a split is drawn from its own generator seeded with
(seed, split, i), so the same seed gives byte-identical files and the splits share no image.

    python research/visualglm/demo/generate_data.py --out /tmp/demo_data --seed 0
"""
import argparse
import hashlib
import io
import json
import os

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
BACKGROUNDS = ((250, 250, 250), (170, 210, 240), (232, 232, 232), (246, 236, 212), (212, 236, 212),
               (242, 222, 232), (222, 228, 250))
ZH_NUMBERS = {1: "一", 2: "两", 3: "三"}
EN_NUMBERS = {0: "no", 1: "one", 2: "two", 3: "three"}
SPLITS = {"train": 0, "heldout": 1, "lora_train": 2, "lora_heldout": 3, "vision_train": 4}
QUESTION_TYPES = ("description", "colour", "shape", "count")
LANGUAGES = ("zh", "en")
DEFAULT_COUNTS = {"train": 6000, "heldout": 150, "lora_train": 800, "lora_heldout": 100, "vision_train": 1800}
IMAGE_SIZE = 96               # the demo model's input size: dataset images are stored at it (no resize)
MAX_ROTATION = 20.0          # degrees either way
MAX_COUNT = 3
SUPERSAMPLE = 4               # shapes are drawn at 4x and downsampled: anti-aliased edges


# ------------------------------------------------------------------------------------------------ scenes
OBJECT_SIZE = (0.2, 0.34)    # an object's size (fraction of the image side), the same range at every count


def _kinds_for(rng, split, index):
    """The shape kind of a scene (a list of one: the scene format allows several kinds, but a model this small
    does not learn which colour goes with which shape in the time budget). The LoRA splits draw stars: every
    other scene of lora_train (the others a base shape, so that the LoRA stage does not unlearn them) and
    every scene of lora_heldout and vision_train."""
    if split in ("lora_heldout", "vision_train") or (split == "lora_train" and index % 2 == 0):
        return [NEW_SHAPE]
    return [str(rng.choice(BASE_SHAPES))]


def make_scene(rng, split="train", index=0):
    """A scene: background, and a list of groups {shape, colour, objects: [(cx, cy, size, angle)]} with
    coordinates as fractions of the image side; objects never overlap."""
    kinds = _kinds_for(rng, split, index)
    colours = list(rng.permutation(list(COLOURS))[:len(kinds)])
    counts = [int(rng.integers(1, MAX_COUNT + 1)) for _ in kinds]
    total = sum(counts)
    low, high = OBJECT_SIZE
    while True:   # rejection sampling of non-overlapping positions (always succeeds quickly at these sizes)
        placed = []
        for _ in range(total):
            for _attempt in range(200):
                size = float(rng.uniform(low, high))
                margin = size / 2 + 0.03
                cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, 2))
                if all((cx - x) ** 2 + (cy - y) ** 2 > ((size + s) * 0.5 * 1.1 + 0.02) ** 2 for x, y, s, _ in placed):
                    placed.append((cx, cy, size, float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))))
                    break
            else:
                break
        if len(placed) == total:
            break
    groups, start = [], 0
    for kind, colour, count in zip(kinds, colours, counts):
        groups.append({"shape": kind, "colour": colour, "objects": placed[start:start + count]})
        start += count
    background = [int(c) for c in BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]]
    gradient = None
    if rng.random() < 0.3:
        other = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        gradient = [int(c) for c in other]
    return {"background": background, "gradient": gradient, "groups": groups,
            "outline": bool(rng.random() < 0.3), "jitter": rng.integers(-14, 15, (len(groups), 3)).tolist(),
            "noise_seed": int(rng.integers(2 ** 31)), "noise": float(rng.uniform(2.0, 7.0))}


def _star_points(cx, cy, radius, angle):
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.42
        theta = np.deg2rad(angle) - np.pi / 2 + k * np.pi / 5
        points.append((cx + r * np.cos(theta), cy + r * np.sin(theta)))
    return points


def _polygon(shape, cx, cy, size, angle):
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


def draw_scene(scene, size=IMAGE_SIZE):
    """The scene as an RGB PIL image of size x size pixels."""
    big = size * SUPERSAMPLE
    top = np.array(scene["background"], np.float32)
    bottom = np.array(scene["gradient"] or scene["background"], np.float32)
    ramp = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
    canvas = (top * (1 - ramp) + bottom * ramp) * np.ones((1, big, 1), np.float32)
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for group, jitter in zip(scene["groups"], scene["jitter"]):
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[group["colour"]][1], jitter))
        outline = tuple(int(c * 0.55) for c in fill) if scene["outline"] else None
        width = max(1, round(0.012 * big)) if outline else 0
        for cx, cy, s, angle in group["objects"]:
            cx, cy, s = cx * big, cy * big, s * big
            if group["shape"] == "circle":
                r = s / 2
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
            else:
                points = _polygon(group["shape"], cx, cy, s, angle)
                draw.polygon(points, fill=fill, outline=outline, width=width)
    img = img.resize((size, size), Image.LANCZOS)
    noise = np.random.default_rng(scene["noise_seed"]).normal(0, scene["noise"], (size, size, 3))
    pixels = np.clip(np.asarray(img, np.float32) + noise, 0, 255)
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------------------ text
def _en_count(shape, count):
    return f"{EN_NUMBERS[count]} {SHAPES[shape][1] if count == 1 else SHAPES[shape][2]}"


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


def questions(scene, rng, split="train"):
    """The eight (type, language, prompt, label, new_concept) records of a scene. In the LoRA splits the
    colour, shape and count questions ask about the star when the scene has one."""
    groups = scene["groups"]
    star = [g for g in groups if g["shape"] == NEW_SHAPE]
    has_star = bool(star)
    focus = star[0] if has_star and split.startswith("lora") else groups[int(rng.integers(len(groups)))]
    records = []
    zh, en = describe(scene)
    zh_prompt = ("描述这张图片。", "这张图片里有什么？")[int(rng.integers(2))]
    en_prompt = ("Describe the image.", "What is in the picture?")[int(rng.integers(2))]
    records += [("description", "zh", zh_prompt, zh, has_star), ("description", "en", en_prompt, en, has_star)]

    shape, colour, count = focus["shape"], focus["colour"], len(focus["objects"])
    zh_shape, en_one, en_many = SHAPES[shape]
    zh_colour = COLOURS[colour][0]
    plural = count > 1
    records.append(("colour", "zh", f"图中的{zh_shape}是什么颜色？", f"{zh_colour}。", shape == NEW_SHAPE))
    records.append(("colour", "en", f"What colour {'are' if plural else 'is'} the {en_many if plural else en_one}?",
                    f"{'They are' if plural else 'It is'} {colour}.", shape == NEW_SHAPE))
    records.append(("shape", "zh", f"图中{zh_colour}的物体是什么形状？", f"{zh_shape}。", shape == NEW_SHAPE))
    records.append(("shape", "en", f"What shape {'are' if plural else 'is'} the {colour} "
                                   f"{'objects' if plural else 'object'}?",
                    f"They are {en_many}." if plural else f"It is a {en_one}.", shape == NEW_SHAPE))

    # count: usually a shape in the scene, sometimes one that is absent (answer: none); never in lora_heldout,
    # whose count questions all measure the star
    present = {g["shape"]: len(g["objects"]) for g in groups}
    asked = shape
    if split != "lora_heldout" and rng.random() < 0.25:
        known = SHAPES if split == "lora_train" else BASE_SHAPES   # the LoRA also learns "no stars here"
        absent = [s for s in known if s not in present]
        asked = absent[int(rng.integers(len(absent)))]
    n = present.get(asked, 0)
    zh_asked, en_one, en_many = SHAPES[asked]
    zh_answer = f"图中没有{zh_asked}。" if n == 0 else f"图中有{ZH_NUMBERS[n]}个{zh_asked}。"
    en_answer = f"There {'is' if n == 1 else 'are'} {_en_count(asked, n)}."
    records.append(("count", "zh", f"图中有几个{zh_asked}？", zh_answer, asked == NEW_SHAPE))
    records.append(("count", "en", f"How many {en_many} are there?", en_answer, asked == NEW_SHAPE))
    return records


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
        for qtype, lang, prompt, label, concept in records:
            entries.append({"img": name, "prompt": prompt, "label": label})
            meta.append({"type": qtype, "lang": lang, "new_concept": bool(concept), "image_index": index})
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


def generate(out, seed=0, counts=None, size=IMAGE_SIZE, splits=tuple(SPLITS)):
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


def corpus_lines(seed=0, counts=None):
    """Every prompt and label text of the splits, in order, repeats kept (the tokenizer's training text), without
    drawing images."""
    counts = dict(DEFAULT_COUNTS, **(counts or {}))
    lines = []
    for split in SPLITS:
        for index in range(counts[split]):
            rng = scene_rng(seed, split, index)
            scene = make_scene(rng, split, index)
            for _, _, prompt, label, _ in questions(scene, rng, split):
                lines += [prompt, label]
    return lines


def chinese_words():
    """The Chinese shape and colour names (word boundaries for the tokenizer)."""
    return tuple(v[0] for v in SHAPES.values()) + tuple(v[0] for v in COLOURS.values())


# Scenes of the example images in examples/ (drawn at 224 px, the model resizes them).
EXAMPLE_SCENES = {
    "demo_blue_square.png": {"background": [250, 250, 250], "gradient": None, "outline": False,
                             "groups": [{"shape": "square", "colour": "blue", "objects": [[0.5, 0.5, 0.28, 8.0]]}],
                             "jitter": [[0, 0, 0]], "noise_seed": 1, "noise": 3.0},
    "demo_triangles.png": {"background": [246, 236, 212], "gradient": None, "outline": False,
                           "groups": [{"shape": "triangle", "colour": "green",
                                       "objects": [[0.25, 0.28, 0.28, 0.0], [0.72, 0.3, 0.27, -6.0],
                                                   [0.48, 0.74, 0.3, 5.0]]}],
                           "jitter": [[0, 0, 0]], "noise_seed": 2, "noise": 3.0},
    "demo_star.png": {"background": [222, 228, 250], "gradient": None, "outline": False,
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="output folder (train/, heldout/, lora_train/, lora_heldout/)")
    parser.add_argument("--seed", type=int, default=0)
    for split, count in DEFAULT_COUNTS.items():
        parser.add_argument(f"--{split}", type=int, default=count, help=f"images in {split} (default {count})")
    parser.add_argument("--splits", nargs="+", choices=tuple(SPLITS), default=list(SPLITS),
                        help="write only these splits (default: all), e.g. --splits lora_train for the star LoRA")
    parser.add_argument("--image_size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--examples", default=None, help="also draw the example images into this folder")
    args = parser.parse_args(argv)
    counts = {split: getattr(args, split) for split in SPLITS}
    written = generate(args.out, args.seed, counts, args.image_size, args.splits)
    for split, n in written.items():
        print(f"{split}: {counts[split]} images, {n} question/answer pairs -> {os.path.join(args.out, split)}")
    if args.examples:
        for path in write_examples(args.examples):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
