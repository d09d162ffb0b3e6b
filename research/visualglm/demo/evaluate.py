"""Exact-match accuracy of the demo model per question type and language on a held-out split.

The model answers every question of the split the way run_visualglm.py does (same yaml, tokenizer, processor,
KV-cache greedy generation, Chinese prompt template for every question, as in training); an answer counts when
it equals the label exactly.

    python research/visualglm/demo/evaluate.py --config research/visualglm/run_visualglm_demo.yaml \
        --data output/visualglm_demo/data/heldout
    python research/visualglm/demo/evaluate.py --config research/visualglm/run_visualglm_demo_lora.yaml \
        --lora_checkpoint research/visualglm/demo/weights/visualglm_demo_lora.ckpt \
        --data output/visualglm_demo/data/lora_heldout

Without --data the held-out splits are generated first (from --seed, into a temporary folder).
"""
import argparse
import json
import os
import tempfile
import time
from argparse import Namespace

from visualglm.fileio import atomic_write, write_text_atomic

QUESTION_TYPES = ("description", "colour", "shape", "count")
LANGUAGES = ("zh", "en")
# The bar: held-out accuracy per language on the base questions, and the LoRA's new concept.
THRESHOLDS = {"colour": 0.9, "shape": 0.9, "count": 0.8}
NEW_CONCEPT_THRESHOLD = 0.8
CONCEPT_TYPES = ("description", "shape", "count")   # on star scenes, the answers that name the star
MAX_DROP = 0.05


def build_engine(config, lora_checkpoint=None, batch_size=16, device_target=None):
    """(VisualGLMChat, components) from an inference yaml, built as run_visualglm.py /
    run_visualglm_with_lora.py build theirs."""
    from visualglm import app
    args = Namespace(config=config, device_target=device_target, device_id=0, batch_size=batch_size, use_past=True,
                     seq_length=None, compute_dtype=None, checkpoint=None, vocab_file=None, seed=None,
                     max_new_tokens=24, max_length=None, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                     repetition_penalty=1.0, english=False)
    components = app.build_components(args)
    if lora_checkpoint:
        from visualglm.finetune import lora_settings
        from visualglm.lora import apply_lora, load_lora
        apply_lora(components.model, **lora_settings(components.settings.yaml))
        load_lora(components.model, lora_checkpoint)
        components.model.set_train(False)
    return app.build_engine(components, args), components


def read_split(folder):
    """[(image path, prompt, label, meta)] of a generated split."""
    with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as f:
        entries = json.load(f)
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return [(os.path.join(folder, e["img"]), e["prompt"], e["label"], m) for e, m in zip(entries, meta)]


def answer_all(engine, samples, batch_size=16):
    answers = []
    for begin in range(0, len(samples), batch_size):
        chunk = samples[begin:begin + batch_size]
        answers += engine.generate([s[0] for s in chunk], [s[1] for s in chunk])
    return answers


def score(samples, answers):
    """{"zh": {type: {"correct", "total", "accuracy"}}, "en": ..., "all": {...}} and the wrong answers."""
    table, wrong = {}, []
    for (image, prompt, label, meta), answer in zip(samples, answers):
        ok = answer == label
        for lang in (meta["lang"], "all"):
            for qtype in (meta["type"], "all"):
                cell = table.setdefault(lang, {}).setdefault(qtype, {"correct": 0, "total": 0})
                cell["correct"] += int(ok)
                cell["total"] += 1
        if not ok:
            wrong.append({"image": os.path.basename(image), "prompt": prompt, "label": label, "answer": answer})
    for lang in table.values():
        for cell in lang.values():
            cell["accuracy"] = round(cell["correct"] / cell["total"], 4)
    return table, wrong


def evaluate_split(engine, folder, batch_size=16):
    samples = read_split(folder)
    start = time.time()
    answers = answer_all(engine, samples, batch_size)
    table, wrong = score(samples, answers)
    return {"split": os.path.basename(os.path.normpath(folder)), "questions": len(samples), "accuracy": table,
            "wrong_examples": wrong[:20], "seconds": round(time.time() - start, 1)}


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
    count); the colour of the star is answerable without knowing the word, so it is not counted."""
    cells = [result["accuracy"]["all"][qtype] for qtype in CONCEPT_TYPES if qtype in result["accuracy"]["all"]]
    return round(sum(c["correct"] for c in cells) / max(1, sum(c["total"] for c in cells)), 4)


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
    checks.append({"what": "new concept (star) with the LoRA", "value": after, "bar": f">= {NEW_CONCEPT_THRESHOLD}",
                   "ok": after >= NEW_CONCEPT_THRESHOLD})
    checks.append({"what": "new concept (star) before the LoRA", "value": before, "bar": "near 0",
                   "ok": before <= 0.2})
    for lang in LANGUAGES:
        for qtype in QUESTION_TYPES:
            drop = _acc(base["heldout"], lang, qtype) - _acc(lora["heldout"], lang, qtype)
            checks.append({"what": f"LoRA drop on held-out {qtype} ({lang})", "value": round(drop, 4),
                           "bar": f"<= {MAX_DROP}", "ok": drop <= MAX_DROP})
    return checks


def markdown(summary):
    """The evaluation table as markdown."""
    ev = summary["evaluation"]
    lines = ["# VisualGLM demo model: held-out exact-match accuracy", "",
             f"Seed {summary['seed']}; {summary['parameters']:,} parameters (+{summary['lora_parameters']:,} LoRA); "
             f"stage 1 {summary['stage1']['steps']} steps, stage 2 {summary['stage2']['steps']} steps; "
             f"trained in {summary.get('total_seconds', 0) / 60:.1f} min on this machine.", "",
             "| question type | base zh | base en | base + LoRA zh | base + LoRA en |", "|---|---|---|---|---|"]
    for qtype in QUESTION_TYPES + ("all",):
        cells = [_cell(ev[model]["heldout"], lang, qtype) for model in ("base", "lora") for lang in LANGUAGES]
        lines.append(f"| {qtype} | " + " | ".join(cells) + " |")
    lines += ["", "New concept (star, taught by the LoRA only), held-out star scenes (the new-concept figure of the "
              "checks counts the description, shape and count questions, whose answers name the star):", "",
              "| question type | before zh | before en | after zh | after en |", "|---|---|---|---|---|"]
    for qtype in QUESTION_TYPES + ("all",):
        cells = [_cell(ev[model]["lora_heldout"], lang, qtype) for model in ("base", "lora") for lang in LANGUAGES]
        lines.append(f"| {qtype} | " + " | ".join(cells) + " |")
    lines += ["", "Checks:", ""]
    lines += [f"- {'ok' if c['ok'] else 'FAILED'}: {c['what']} = {c['value']:.3f} ({c['bar']})" for c in ev["checks"]]
    return "\n".join(lines) + "\n"


def _cell(result, lang, qtype):
    cell = result["accuracy"].get(lang, {}).get(qtype)
    return "-" if cell is None else f"{100 * cell['accuracy']:.1f}% ({cell['correct']}/{cell['total']})"


def write_report(summary, json_path, md_path):
    report = {k: summary[k] for k in ("seed", "model", "vocab_size", "parameters", "lora_parameters", "weights_bytes",
                                      "data", "vision", "stage1", "stage2", "vision_seconds",
                                      "stage1_seconds", "stage2_seconds",
                                      "total_seconds", "evaluation") if k in summary}
    with atomic_write(json_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
        f.write("\n")
    write_text_atomic(md_path, markdown(summary))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="run_visualglm_demo.yaml", help="inference yaml of the demo model")
    parser.add_argument("--lora_checkpoint", default=None, help="LoRA weights (LoRA settings: the yaml's pet_config)")
    parser.add_argument("--data", default=None, help="a generated split folder (dataset.json + meta.json)")
    parser.add_argument("--seed", type=int, default=0, help="data seed when --data is not given")
    parser.add_argument("--split", default="heldout", choices=("heldout", "lora_heldout"),
                        help="which held-out split to generate when --data is not given")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device_target", default=None)
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    from visualglm import app
    from visualglm.cli import run_main  # noqa: F401  (same error handling as the scripts)
    lora = app.resolve_path(args.lora_checkpoint, app.REPO_ROOT) if args.lora_checkpoint else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data
        if folder is None:
            from visualglm.demo.generate_data import DEFAULT_COUNTS, write_split
            write_split(tmp, args.split, DEFAULT_COUNTS[args.split], args.seed)
            folder = os.path.join(tmp, args.split)
        engine, _ = build_engine(args.config, lora, args.batch_size, args.device_target)
        result = evaluate_split(engine, folder, args.batch_size)
    print(f"{'question type':14s} " + " ".join(f"{lang:>16s}" for lang in LANGUAGES + ("all",)))
    for qtype in QUESTION_TYPES + ("all",):
        print(f"{qtype:14s} " + " ".join(f"{_cell(result, lang, qtype):>16s}" for lang in LANGUAGES + ("all",)))
    if args.json:
        with atomic_write(args.json) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
    return result


if __name__ == "__main__":
    from visualglm.cli import run_main as _run
    _run(main)
