"""The training loss curve of a finetune run: `loss_curve.csv` (step, loss, lr) and `loss_curve.png`, written
atomically into the output folder.

The plot is drawn with PIL (already a dependency) rather than matplotlib, which the stack does not ship.
"""
import csv
import math
import os

from visualglm.fileio import atomic_write

CSV_NAME, PNG_NAME = "loss_curve.csv", "loss_curve.png"
WIDTH, HEIGHT = 800, 480
MARGIN = {"left": 80, "right": 24, "top": 40, "bottom": 56}
RAW_COLOUR, SMOOTH_COLOUR, AXIS_COLOUR, GRID_COLOUR = (150, 180, 230), (20, 60, 170), (40, 40, 40), (225, 225, 225)
TICKS = 5


def write_csv(path, rows):
    """rows: (step, loss, lr) tuples, in step order."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("step", "loss", "lr"))
        writer.writerows((int(step), f"{loss:.6g}", f"{lr:.6g}") for step, loss, lr in rows)


def read_csv(path, up_to):
    """The rows of an earlier write_csv with step <= up_to (what a resumed run keeps); [] without the file."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", newline="") as f:
        rows = [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)]
    return [row for row in rows if row[0] <= up_to]


def smooth(values, window):
    """Trailing moving average over `window` values (the first ones over what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _nice_ticks(low, high):
    """About TICKS round values spanning [low, high]."""
    span = high - low or abs(high) or 1.0
    raw = span / TICKS
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def write_png(path, rows, title):
    """Loss against step: every step (light) and a moving average over a twentieth of the run (dark)."""
    from PIL import Image, ImageDraw
    steps = [row[0] for row in rows]
    losses = [row[1] for row in rows]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]
    finite = [v for v in losses if math.isfinite(v)] or [0.0]
    low, high = min(min(finite), 0.0), max(finite)   # from 0: a cross-entropy is never below it
    if high == low:
        low, high = low - 0.5, high + 0.5
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, loss):
        x = left + (step - first) / (last - first) * (right - left)
        y = bottom - (min(max(loss, low), high) - low) / (high - low) * (bottom - top)
        return x, y

    for value in _nice_ticks(low, high):
        y = xy(first, value)[1]
        draw.line([(left, y), (right, y)], fill=GRID_COLOUR)
        draw.text((left - 8, y), f"{value:.4g}", fill=AXIS_COLOUR, anchor="rm")
    for value in _nice_ticks(first, last):
        x = xy(value, low)[0]
        draw.line([(x, bottom), (x, bottom + 5)], fill=AXIS_COLOUR)
        draw.text((x, bottom + 8), f"{value:g}", fill=AXIS_COLOUR, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS_COLOUR)
    draw.text(((left + right) / 2, HEIGHT - 18), "step", fill=AXIS_COLOUR, anchor="mm")
    draw.text((left, top - 14), f"{title}: loss (light: every step; dark: moving average)", fill=AXIS_COLOUR,
              anchor="lm")
    if len(rows) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=RAW_COLOUR, width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth(losses, max(1, len(rows) // 20)))], fill=SMOOTH_COLOUR,
                  width=2)
    else:
        x, y = xy(steps[0], losses[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=SMOOTH_COLOUR)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
