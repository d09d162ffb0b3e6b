"""Draw the example images of the run scripts (simple synthetic scenes, deterministic).

    python examples/make_examples.py                 # writes the images next to this script
    python examples/make_examples.py --out_dir DIR   # or into DIR

Only PIL drawing primitives are used (no fonts, no randomness), so the images are the same on every run.
"""
import argparse
import os
import sys

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "research"))   # the package, installed or not
from visualglm.fileio import atomic_write  # noqa: E402  pylint: disable=wrong-import-position


def red_circle():
    """A red circle on a light-blue background (square, 224 x 224)."""
    img = Image.new("RGB", (224, 224), (170, 210, 240))
    draw = ImageDraw.Draw(img)
    draw.ellipse((52, 52, 172, 172), fill=(220, 30, 30), outline=(120, 10, 10), width=4)
    return img


def shapes():
    """Three green triangles, a yellow square and a purple circle on white (wide, 320 x 240)."""
    img = Image.new("RGB", (320, 240), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for x in (20, 120, 220):
        draw.polygon([(x, 100), (x + 80, 100), (x + 40, 30)], fill=(40, 170, 60))
    draw.rectangle((40, 140, 120, 220), fill=(240, 210, 40))
    draw.ellipse((190, 140, 270, 220), fill=(130, 50, 170))
    return img


def sunset():
    """A sky gradient, a sun, the sea and a small boat (a JPEG, 300 x 200)."""
    width, height, horizon = 300, 200, 120
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(horizon):
        t = y / horizon
        draw.line([(0, y), (width, y)], fill=(int(250 - 40 * t), int(120 + 60 * t), int(60 + 40 * t)))
    draw.ellipse((120, 70, 180, 130), fill=(255, 200, 60))
    for y in range(horizon, height):
        t = (y - horizon) / (height - horizon)
        draw.line([(0, y), (width, y)], fill=(int(20 + 20 * t), int(60 + 30 * t), int(120 + 40 * t)))
    draw.polygon([(60, 150), (120, 150), (110, 162), (70, 162)], fill=(90, 50, 20))
    draw.line([(90, 150), (90, 118)], fill=(60, 40, 20), width=2)
    draw.polygon([(92, 120), (92, 148), (112, 148)], fill=(240, 240, 240))
    return img


def house():
    """A house with a red roof, a door and two windows on grass under a blue sky (224 x 224)."""
    img = Image.new("RGB", (224, 224), (120, 180, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 170, 224, 224), fill=(60, 160, 60))
    draw.rectangle((52, 100, 172, 180), fill=(230, 220, 190))
    draw.polygon([(40, 100), (184, 100), (112, 40)], fill=(190, 40, 40))
    draw.rectangle((100, 135, 124, 180), fill=(110, 70, 30))
    for x in (66, 140):
        draw.rectangle((x, 115, x + 20, 135), fill=(180, 220, 255), outline=(80, 80, 80))
    return img


EXAMPLES = {"red_circle.png": red_circle, "shapes.png": shapes, "sunset.jpg": sunset, "house.png": house}


def main(folder=HERE):
    for name, draw in EXAMPLES.items():
        path = os.path.join(folder, name)
        image = draw()
        with atomic_write(path) as tmp:
            if name.endswith(".jpg"):
                image.save(tmp, quality=90, optimize=False, progressive=False)
            else:
                image.save(tmp, optimize=False)
        print(f"wrote {path} {image.size[0]}x{image.size[1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out_dir", default=HERE, help="folder for the images (default: next to this script)")
    main(parser.parse_args().out_dir)
