"""Exact-match accuracy of the demo model per question type, language and scene variation on held-out images.

The model answers every record of a split the way the chat front ends do (same yaml, tokenizer, processor,
KV-cache greedy generation, Chinese prompt template for every question, as in training; a chat turn with its
history); an answer counts when it equals the label exactly. Held-out images come from an evaluation seed the
training never uses (EVAL_SEED + the training seed), drawn from the same wide distribution as training.

    python research/visualglm/demo/evaluate.py --config research/visualglm/run_visualglm_demo.yaml
    python research/visualglm/demo/evaluate.py --config research/visualglm/run_visualglm_demo_lora.yaml \
        --lora_checkpoint research/visualglm/demo/weights/visualglm_demo_lora.ckpt --split lora_heldout

Without --data the split is generated first (from --seed, into a temporary folder).
"""
import argparse
import json
import os
import tempfile
import time
from argparse import Namespace

from visualglm.demo.generate_data import LANGUAGES, NEW_SHAPE, QUESTION_TYPES, SHAPES
from visualglm.errors import UserError
from visualglm.fileio import atomic_write, write_text_atomic

EVAL_SEED = 1000   # held-out images are drawn with EVAL_SEED + the training seed: images training never saw
# The bar: held-out accuracy per language of the base model (and of base + LoRA on the base scenes).
THRESHOLDS = {"colour": 0.95, "shape": 0.95, "count": 0.95, "description": 0.90, "follow-up": 0.90}
STAR_THRESHOLD = 0.95          # base + LoRA on star scenes, the answers that name the star
FALSE_STAR_LIMIT = 0.02        # base + LoRA: share of star-free images for which some answer names a star
MAX_DROP = 0.03                # base + LoRA against base on the base scenes, per question type and language
VARIATION_TYPES = ("colour", "shape", "count", "description", "follow-up")
ENTRY_KEYS = ("img", "label")                                                  # of dataset.json, read here
META_KEYS = ("question", "history", "type", "lang", "has_star", "variation")   # of meta.json
STAR_WORDS = (SHAPES[NEW_SHAPE][0], SHAPES[NEW_SHAPE][1])   # 星形, star (and stars)


def build_engine(config, lora_checkpoint=None, batch_size=16, device_target=None):
    """(VisualGLMChat, components) from an inference yaml, built as run_visualglm.py /
    run_visualglm_with_lora.py build theirs."""
    from visualglm import app
    args = Namespace(config=config, device_target=device_target, device_id=0, batch_size=batch_size, use_past=True,
                     seq_length=None, compute_dtype=None, checkpoint=None, vocab_file=None, seed=None,
                     max_new_tokens=32, max_length=None, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                     repetition_penalty=1.0, english=False, quantization_bit=None)
    components = app.build_components(args)
    if lora_checkpoint:
        from visualglm.finetune import trained_lora_settings
        from visualglm.lora import apply_lora, load_lora
        settings = components.settings
        apply_lora(components.model, **trained_lora_settings(settings.yaml, settings.config_path,
                                                              "--lora_checkpoint"))
        load_lora(components.model, lora_checkpoint)
        components.model.set_train(False)
    return app.build_engine(components, args), components


def _split_file(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise UserError(f"--data {folder}: {'is a file' if os.path.exists(folder) else 'no such folder'}; expected "
                        "the folder of a split generate_data.py wrote (dataset.json, meta.json, images/)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--data {folder}: no {name}; expected a split generate_data.py wrote") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"--data {folder}: {name} is not UTF-8 JSON ({err})") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise UserError(f"--data {folder}: {name} is not a JSON list of objects")
    return data


def read_split(folder):
    """[(image path, question, history, label, meta)] of a generated split; UserError naming what is wrong with
    a folder that is not one."""
    entries, meta = _split_file(folder, "dataset.json"), _split_file(folder, "meta.json")
    if len(entries) != len(meta):
        raise UserError(f"--data {folder}: dataset.json has {len(entries)} entries, meta.json {len(meta)}; "
                        "expected one meta record per entry")
    for name, records, keys in (("dataset.json", entries, ENTRY_KEYS), ("meta.json", meta, META_KEYS)):
        for number, record in enumerate(records, 1):
            missing = [key for key in keys if key not in record]
            if missing:
                raise UserError(f"--data {folder}: {name} record {number} lacks {', '.join(missing)}; expected "
                                f"the keys {', '.join(keys)} (as generate_data.py writes them)")
    return [(os.path.join(folder, e["img"]), m["question"], [tuple(turn) for turn in m["history"]], e["label"], m)
            for e, m in zip(entries, meta)]


def answer_all(engine, samples, batch_size=16):
    answers = []
    for begin in range(0, len(samples), batch_size):
        chunk = samples[begin:begin + batch_size]
        answers += engine.generate([s[0] for s in chunk], [s[1] for s in chunk], [s[2] for s in chunk])
    return answers


def _add(table, key, ok):
    cell = table.setdefault(key, {"correct": 0, "total": 0})
    cell["correct"] += int(ok)
    cell["total"] += 1


def _finish(cells):
    for cell in cells:
        cell["accuracy"] = round(cell["correct"] / cell["total"], 4)


def names_star(text):
    return any(word in text.lower() for word in STAR_WORDS)


def score(samples, answers):
    """({"zh": {type: {"correct", "total", "accuracy"}}, "en": ..., "all": ...}, {variation: {value: {type:
    cell}}}, star-free images {"named_star", "total", "share"}, the wrong answers)."""
    table, variations, wrong, false_star = {}, {}, [], {}
    for (image, question, history, label, meta), answer in zip(samples, answers):
        ok = answer == label
        for lang in (meta["lang"], "all"):
            for qtype in (meta["type"], "all"):
                _add(table.setdefault(lang, {}), qtype, ok)
        if meta["type"] in VARIATION_TYPES:
            for name, value in meta["variation"].items():
                _add(variations.setdefault(name, {}).setdefault(str(value), {}), meta["type"], ok)
        if not meta["has_star"]:   # an answer that names a star where the label does not
            false_star[image] = false_star.get(image, False) or (names_star(answer) and not ok)
        if not ok:
            wrong.append({"image": os.path.basename(image), "history": history, "question": question, "label": label,
                          "answer": answer})
    _finish([cell for lang in table.values() for cell in lang.values()])
    _finish([cell for values in variations.values() for row in values.values() for cell in row.values()])
    named = sum(false_star.values())
    stars = {"named_star": named, "images": len(false_star), "share": round(named / max(1, len(false_star)), 4)}
    return table, variations, stars, wrong


def evaluate_split(engine, folder, batch_size=16):
    samples = read_split(folder)
    start = time.time()
    answers = answer_all(engine, samples, batch_size)
    table, variations, stars, wrong = score(samples, answers)
    return {"split": os.path.basename(os.path.normpath(folder)), "questions": len(samples), "accuracy": table,
            "variations": variations, "star_free_images": stars, "star_questions": star_questions(samples, answers),
            "wrong_examples": wrong[:30], "seconds": round(time.time() - start, 1)}


def evaluate_all(base_yaml, lora_yaml, lora_checkpoint, data, batch_size=16):
    """Base model and base + LoRA, each on heldout/ (the base questions) and lora_heldout/ (the new concept)."""
    results = {}
    for name, config, lora in (("base", base_yaml, None), ("lora", lora_yaml, lora_checkpoint)):
        engine, _ = build_engine(config, lora, batch_size)
        results[name] = {split: evaluate_split(engine, os.path.join(data, split), batch_size)
                         for split in ("heldout", "lora_heldout")}
        for split, result in results[name].items():
            print(f"{name} on {split}: {format_row(result['accuracy'])} ({result['seconds']:.0f} s)", flush=True)
    results["checks"] = check(results)
    return results


def format_row(table):
    return ", ".join(f"{lang} {qtype} {table[lang][qtype]['accuracy']:.3f}" for lang in ("zh", "en", "all")
                     for qtype in QUESTION_TYPES + ("all",) if qtype in table.get(lang, {}))


def _acc(result, lang, qtype):
    return result["accuracy"].get(lang, {}).get(qtype, {}).get("accuracy", 0.0)


def concept_accuracy(result):
    """Accuracy on the held-out star scenes over the questions whose answer names the star (description, shape,
    count and their follow-ups); the colour of the star is answerable without knowing the word."""
    return result.get("star_questions", {}).get("accuracy", 0.0)


def star_questions(samples, answers):
    """{"correct", "total", "accuracy"} over the records whose label names the star."""
    cell = {"correct": 0, "total": 0}
    for sample, answer in zip(samples, answers):
        if names_star(sample[3]):
            cell["correct"] += int(answer == sample[3])
            cell["total"] += 1
    cell["accuracy"] = round(cell["correct"] / max(1, cell["total"]), 4)
    return cell


def check(results):
    """The issue's thresholds as a list of {"what", "value", "bar", "ok"}."""
    checks = []
    base, lora = results["base"], results["lora"]
    for lang in LANGUAGES:
        for qtype, bar in THRESHOLDS.items():
            value = _acc(base["heldout"], lang, qtype)
            checks.append({"what": f"base held-out {qtype} ({lang})", "value": value, "bar": f">= {bar}",
                           "ok": value >= bar})
    after, before = concept_accuracy(lora["lora_heldout"]), concept_accuracy(base["lora_heldout"])
    checks.append({"what": "new concept (star) with the LoRA", "value": after, "bar": f">= {STAR_THRESHOLD}",
                   "ok": after >= STAR_THRESHOLD})
    checks.append({"what": "new concept (star) before the LoRA", "value": before, "bar": "near 0",
                   "ok": before <= 0.2})
    false_star = lora["heldout"]["star_free_images"]["share"]
    checks.append({"what": "star-free images the LoRA calls star", "value": false_star,
                   "bar": f"<= {FALSE_STAR_LIMIT}", "ok": false_star <= FALSE_STAR_LIMIT})
    for lang in LANGUAGES:
        for qtype in QUESTION_TYPES:
            drop = round(_acc(base["heldout"], lang, qtype) - _acc(lora["heldout"], lang, qtype), 4)
            checks.append({"what": f"LoRA drop on held-out {qtype} ({lang})", "value": drop,
                           "bar": f"<= {MAX_DROP}", "ok": drop <= MAX_DROP})
    return checks


def markdown(summary):
    """The evaluation tables as markdown."""
    ev = summary["evaluation"]
    lines = ["# VisualGLM demo model: held-out exact-match accuracy", "",
             f"Training seed {summary['seed']}, held-out images from seed {summary['eval_seed']} (never seen in "
             f"training); {summary['parameters']:,} parameters (+{summary['lora_parameters']:,} LoRA); "
             f"stage 0 {summary['vision']['steps']} steps, stage 1 {summary['stage1']['steps']} steps, "
             f"stage 2 {summary['stage2']['steps']} steps; trained in {summary.get('total_seconds', 0) / 60:.1f} min "
             "on this machine.", "",
             f"Held-out base scenes ({ev['base']['heldout']['questions']} questions):", "",
             "| question type | base zh | base en | base + LoRA zh | base + LoRA en |", "|---|---|---|---|---|"]
    for qtype in QUESTION_TYPES + ("all",):
        cells = [_cell(ev[model]["heldout"], lang, qtype) for model in ("base", "lora") for lang in LANGUAGES]
        lines.append(f"| {qtype} | " + " | ".join(cells) + " |")
    lines += ["", "Base model per scene variation (both languages):", "",
              "| variation | " + " | ".join(VARIATION_TYPES) + " |", "|---|" + "---|" * len(VARIATION_TYPES)]
    for name, values in ev["base"]["heldout"]["variations"].items():
        for value, row in sorted(values.items()):
            cells = [f"{100 * row[t]['accuracy']:.1f}% ({row[t]['total']})" if t in row else "-"
                     for t in VARIATION_TYPES]
            lines.append(f"| {name} = {value} | " + " | ".join(cells) + " |")
    stars = ev["lora"]["heldout"]["star_free_images"]
    lines += ["", "New concept (star, taught by the LoRA only), held-out star scenes (the new-concept check counts "
              "the answers that name the star):", "",
              "| question type | before zh | before en | after zh | after en |", "|---|---|---|---|---|"]
    for qtype in QUESTION_TYPES + ("all",):
        cells = [_cell(ev[model]["lora_heldout"], lang, qtype) for model in ("base", "lora") for lang in LANGUAGES]
        lines.append(f"| {qtype} | " + " | ".join(cells) + " |")
    lines += ["", f"Star-free held-out images for which base + LoRA names a star in some answer: {stars['named_star']} "
                  f"of {stars['images']} ({100 * stars['share']:.1f}%).", "", "Checks:", ""]
    lines += [f"- {'ok' if c['ok'] else 'FAILED'}: {c['what']} = {c['value']:.3f} ({c['bar']})" for c in ev["checks"]]
    return "\n".join(lines) + "\n"


def _cell(result, lang, qtype):
    cell = result["accuracy"].get(lang, {}).get(qtype)
    return "-" if cell is None else f"{100 * cell['accuracy']:.1f}% ({cell['correct']}/{cell['total']})"


def write_report(summary, json_path, md_path):
    report = {k: summary[k] for k in ("seed", "eval_seed", "model", "vocab_size", "parameters", "lora_parameters",
                                      "weights_bytes", "data", "vision", "stage1", "stage2", "vision_seconds",
                                      "stage1_seconds", "stage2_seconds", "total_seconds", "evaluation")
              if k in summary}
    with atomic_write(json_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
        f.write("\n")
    write_text_atomic(md_path, markdown(summary))


def main(argv=None):
    from visualglm.cli import non_negative_int, positive_int
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="run_visualglm_demo.yaml", help="inference yaml of the demo model")
    parser.add_argument("--lora_checkpoint", default=None, help="LoRA weights (LoRA settings: the yaml's pet_config)")
    parser.add_argument("--data", default=None, help="a generated split folder (dataset.json + meta.json)")
    parser.add_argument("--seed", type=non_negative_int, default=EVAL_SEED,
                        help=f"data seed when --data is not given (default {EVAL_SEED}: images training never saw)")
    parser.add_argument("--split", default="heldout", choices=("heldout", "lora_heldout"),
                        help="which held-out split to generate when --data is not given")
    parser.add_argument("--images", type=positive_int, default=None,
                        help="images to generate (default: the split's own)")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--device_target", default=None)
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    from visualglm import app
    lora = app.lora_checkpoint_path(args.lora_checkpoint) if args.lora_checkpoint else None   # not silently the base
    if args.data is not None:
        read_split(args.data)   # a bad folder is named before the model is built
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data
        if folder is None:
            from visualglm.demo.generate_data import DEFAULT_COUNTS, write_split
            write_split(tmp, args.split, DEFAULT_COUNTS[args.split] if args.images is None else args.images, args.seed)
            folder = os.path.join(tmp, args.split)
        engine, _ = build_engine(args.config, lora, args.batch_size, args.device_target)
        result = evaluate_split(engine, folder, args.batch_size)
    table, stars = result["accuracy"], result["star_free_images"]
    print(f"{'question type':14s} " + " ".join(f"{lang:>16s}" for lang in LANGUAGES + ("all",)))
    for qtype in QUESTION_TYPES + ("all",):
        if qtype in table["all"]:
            print(f"{qtype:14s} " + " ".join(f"{_cell(result, lang, qtype):>16s}" for lang in LANGUAGES + ("all",)))
    if stars["images"]:
        print(f"star-free images with a star in some answer: {stars['named_star']} of {stars['images']}")
    if result["star_questions"]["total"]:
        cell = result["star_questions"]
        print(f"answers that should name the star: {cell['correct']} of {cell['total']} right")
    if args.json:
        with atomic_write(args.json) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
    return result


if __name__ == "__main__":
    from visualglm.cli import run_main as _run
    _run(main)
