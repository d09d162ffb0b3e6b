"""Make the small synthetic finetuning dataset of this folder: 8 PNG scenes drawn with PIL, `dataset.json`
(a list of {"img", "prompt", "label"}, image paths relative to this folder, the THUDM few-shot format) and
`finetune_inputs.jsonl` (a reference query for LoRA inference, paths relative to the repo root).

Deterministic: running it again writes identical files.

    python finetune/make_dataset.py [--out DIR]
"""
import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research"))
from visualglm.fileio import atomic_write  # noqa: E402  pylint: disable=wrong-import-position

SIZE = 224
PROMPT = "这张图片的背景里有什么内容？"


def _sky_and_ground(sky, ground, horizon=140):
    img = Image.new("RGB", (SIZE, SIZE), sky)
    ImageDraw.Draw(img).rectangle([0, horizon, SIZE, SIZE], fill=ground)
    return img


def _dots(draw, rng, count, color, area, radius=2):
    x0, y0, x1, y1 = area
    for _ in range(count):
        x, y = rng.randint(x0, x1), rng.randint(y0, y1)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)


def sea(rng):
    img = _sky_and_ground((110, 180, 240), (20, 70, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse([160, 20, 200, 60], fill=(255, 220, 40))
    for y in (160, 185, 210):
        draw.line([(10, y), (214, y)], fill=(200, 230, 255), width=2)
    return img


def grassland(rng):
    img = _sky_and_ground((120, 190, 250), (60, 170, 60), horizon=120)
    draw = ImageDraw.Draw(img)
    draw.ellipse([30, 25, 90, 55], fill=(255, 255, 255))
    draw.ellipse([60, 15, 120, 50], fill=(255, 255, 255))
    _dots(draw, rng, 25, (250, 240, 90), (0, 130, 223, 223), radius=3)
    return img


def night_sky(rng):
    img = Image.new("RGB", (SIZE, SIZE), (15, 20, 60))
    draw = ImageDraw.Draw(img)
    _dots(draw, rng, 40, (255, 255, 255), (0, 0, 223, 223), radius=1)
    draw.ellipse([150, 30, 200, 80], fill=(250, 240, 170))
    draw.ellipse([165, 22, 215, 72], fill=(15, 20, 60))
    return img


def sunset(rng):
    img = Image.new("RGB", (SIZE, SIZE), (250, 120, 40))
    draw = ImageDraw.Draw(img)
    for i, color in enumerate([(240, 80, 60), (250, 120, 40), (255, 170, 60), (255, 210, 110)]):
        draw.rectangle([0, i * 40, SIZE, i * 40 + 40], fill=color)
    draw.ellipse([82, 130, 142, 190], fill=(255, 90, 30))
    draw.rectangle([0, 165, SIZE, SIZE], fill=(60, 40, 70))
    return img


def snow(rng):
    img = _sky_and_ground((170, 170, 180), (250, 250, 250), horizon=150)
    draw = ImageDraw.Draw(img)
    _dots(draw, rng, 60, (255, 255, 255), (0, 0, 223, 150), radius=2)
    return img


def desert(rng):
    img = _sky_and_ground((170, 215, 245), (230, 200, 110), horizon=130)
    draw = ImageDraw.Draw(img)
    draw.rectangle([100, 80, 116, 180], fill=(40, 140, 60))
    draw.rectangle([80, 110, 100, 122], fill=(40, 140, 60))
    draw.rectangle([80, 92, 90, 122], fill=(40, 140, 60))
    return img


def red_square(rng):
    img = Image.new("RGB", (SIZE, SIZE), (245, 245, 240))
    ImageDraw.Draw(img).rectangle([72, 72, 152, 152], fill=(220, 30, 30))
    return img


def checkerboard(rng):
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = SIZE // 8
    for row in range(8):
        for col in range(8):
            if (row + col) % 2:
                draw.rectangle([col * cell, row * cell, col * cell + cell - 1, row * cell + cell - 1], fill=(0, 0, 0))
    return img


SCENES = [
    ("sea", sea, "这张图片的背景是蓝色的大海和晴朗的天空，天上有一个黄色的太阳。"),
    ("grassland", grassland, "这张图片的背景是绿色的草地和蓝天白云，草地上开着黄色的小花。"),
    ("night_sky", night_sky, "这张图片的背景是深蓝色的夜空，上面有许多星星和一弯月亮。"),
    ("sunset", sunset, "这张图片的背景是橙红色的晚霞，太阳正在落山。"),
    ("snow", snow, "这张图片的背景是白雪覆盖的地面和灰色的天空，空中飘着雪花。"),
    ("desert", desert, "这张图片的背景是黄色的沙漠和浅蓝色的天空，沙漠里有一棵绿色的仙人掌。"),
    ("red_square", red_square, "这张图片的背景是一面白色的墙，墙前有一个红色的正方形。"),
    ("checkerboard", checkerboard, "这张图片的背景是黑白相间的棋盘格。"),
]


def make_dataset(out_dir):
    """Write the images, dataset.json and finetune_inputs.jsonl into out_dir; return the dataset entries."""
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for index, (name, draw, label) in enumerate(SCENES):
        img = draw(random.Random(index))
        # few colours: a palette PNG keeps the files small; no timestamps, so the bytes are reproducible
        with atomic_write(os.path.join(out_dir, f"{name}.png")) as tmp:
            img.quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(tmp, optimize=True)
        entries.append({"img": f"{name}.png", "prompt": PROMPT, "label": label})
    with atomic_write(os.path.join(out_dir, "dataset.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(entries, f, ensure_ascii=False, indent=2)
        f.write("\n")
    with atomic_write(os.path.join(out_dir, "finetune_inputs.jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": 1, "text": PROMPT, "image": "finetune/sea.png"}, ensure_ascii=False) + "\n")
    return entries


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="output folder (default: this script's folder)")
    args = parser.parse_args()
    entries = make_dataset(args.out)
    print(f"wrote {len(entries)} images, dataset.json and finetune_inputs.jsonl to {args.out}")


if __name__ == "__main__":
    main()
