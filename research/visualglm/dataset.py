"""The LoRA-finetuning dataset (spec §15.1, §15.2, §15.5).

* `read_dataset_json(path)`: the THUDM `dataset.json` (a list of `{"img", "prompt", "label"}`) as a list of
  `FinetuneSample(image, prompt, label)`, with image paths resolved and confined to an image root (default:
  the dataset file's folder); `check_images(samples)` checks every image before training.
* `build_sample(...)`: one training sample (§15.2) as a dict in the column order `COLUMN_NAMES`:

  ========================  =====================  ==================================================
  column                    shape, dtype           content
  ========================  =====================  ==================================================
  ``image``                 [3, S, S] float32      CLIP-normalised pixels (S = 224)
  ``input_ids``             [L] int32              prompt, [gMASK], <sop>, label, <eop>, then pad
  ``labels``                [L] int32              -100 before <sop>; the ids from <sop> to <eop>; -100 on padding
  ``position_id``           [2, L] int32           GLM position ids and block position ids (§7.4)
  ``attention_mask``        [1, L, L] bool         **True = may attend** (the convention of `glm.py`)
  ``image_start``           [] int32               index of the first image slot (measured, not assumed)
  ========================  =====================  ==================================================

  with L = max_source_length + max_target_length. The mask is NOT MindFormers' inverted int32 mask
  (True = blocked): it is the boolean mask the model in this package takes; squeeze its axis 1 to get the
  model's `[B, L, L]`.
* `SFTDataset` (row i), `RandomMappingDataset` (length N·scale, index -> a row drawn reproducibly per index,
  with replacement) and `dataset_scale(...)`: the random-access sources of MindFormers'
  `VisualGLMDataLoader` (§15.5).
* `build_finetune_dataset(...)`: a batched, sharded `mindspore.dataset.GeneratorDataset`.
"""
import codecs
import json
import logging
import operator
import os
import random
import warnings
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from PIL import Image

from visualglm.errors import UserError
from visualglm.glm import glm_position_ids_and_mask
from visualglm.processing import VisualGLMImageProcessor, VisualGLMProcessor, build_prompt, load_image

__all__ = ["COLUMN_NAMES", "IGNORE_INDEX", "FinetuneSample", "RandomMappingDataset", "SFTDataset",
           "SampleBuilder", "build_finetune_dataset", "build_sample", "check_images", "dataset_scale",
           "random_mapping_index", "read_dataset_json"]

logger = logging.getLogger(__name__)

COLUMN_NAMES = ("image", "input_ids", "labels", "position_id", "attention_mask", "image_start")
IGNORE_INDEX = -100
_FIELDS = ("img", "prompt", "label")
_ORDINALS = ("1st", "2nd", "3rd")
_MAX_LISTED = 10


# ---------------------------------------------------------------------------------------------- dataset.json
class FinetuneSample(NamedTuple):
    """One annotated image: the resolved image path, the question and the answer."""
    image: str
    prompt: str
    label: str


def _entry_fields(entry, where):
    """(img, prompt, label) of one parsed entry: by key when it has any of img/prompt/label, else MindFormers'
    rule, the first three values in order (one value: (img, "", ""), two: (img, prompt, ""))."""
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object {{\"img\": ..., \"prompt\": ..., \"label\": ...}}, "
                        f"got {type(entry).__name__} {_short(entry)}")
    if any(key in entry for key in _FIELDS):
        if "img" not in entry:
            raise UserError(f"{where}: missing field 'img' (the image path)")
        values = [(f"'{key}'", entry.get(key, "")) for key in _FIELDS]
    else:
        if not entry:
            raise UserError(f"{where}: missing field 'img' (the entry is an empty object)")
        given = list(entry.items())[:3]
        values = [(f"'{key}' (the {_ORDINALS[i]} value, read as {_FIELDS[i]})", value)
                  for i, (key, value) in enumerate(given)]
        values += [(f"'{_FIELDS[i]}'", "") for i in range(len(given), 3)]
    (img_name, img), (prompt_name, prompt), (label_name, label) = values
    if not isinstance(img, str) or not img.strip():
        raise UserError(f"{where}: field {img_name} must be a non-empty image path, got {_short(img)}")
    for name, value in ((prompt_name, prompt), (label_name, label)):
        if not isinstance(value, str):
            raise UserError(f"{where}: field {name} must be a string, got {type(value).__name__} {_short(value)}")
    return img, prompt, label


def _short(value, limit=60):
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _inside(path, root):
    """Whether real path `path` is `root` or under it (by components: /data2 is not inside /data)."""
    return os.path.commonpath([path, root]) == root


def _image_root(image_root, path):
    """The real folder the image paths of dataset file `path` must stay in: `image_root`, default the file's
    folder."""
    if image_root is None:
        return os.path.realpath(os.path.dirname(os.path.abspath(path)))
    folder = os.path.expanduser(os.fspath(image_root))
    if not os.path.isdir(folder):
        raise UserError(f"image root {folder!r} is not a folder")
    return os.path.realpath(folder)


def _resolve_image(img, root, where):
    """The real path of image `img` of entry `where`, relative to `root` or absolute; it must lie inside `root`
    (real paths, so neither '..' nor a symlink leads out: a dataset file must not make training read any file).
    If `root/img` does not exist but `img` relative to the current directory is a file inside `root`, that one:
    THUDM's fewshot-data/dataset.json names its images "fewshot-data/2p.png", relative to the folder above."""
    if "\0" in img:
        raise UserError(f"{where}: image path {img!r} contains a NUL byte")
    expanded = os.path.expanduser(img)
    path = os.path.realpath(os.path.join(root, expanded))
    if not os.path.exists(path) and os.path.isfile(expanded):
        fallback = os.path.realpath(expanded)
        if _inside(fallback, root):
            return fallback
    if not _inside(path, root):
        raise UserError(f"{where}: image path {img!r} leads outside the image root {root} (to {path}); "
                        f"move the image under {root} or pass --image_root with a folder that holds it")
    return path


def _read_text(path):
    """The text of the UTF-8 dataset file `path` (a leading BOM dropped); other bytes are a UserError saying
    where: the line of a .jsonl file, else the byte offset."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError(f"cannot read dataset file {path}: {err.strerror or err}") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        lineno = data.count(b"\n", 0, offset) + 1
        where = f"line {lineno}" if path.endswith(".jsonl") else f"byte offset {offset}"
        raise UserError(f"{path} {where}: not UTF-8 text (byte 0x{data[offset]:02x}); save the file as UTF-8") \
            from None


DATASET_FILE = "dataset.json"   # the file a dataset folder holds (generate_data.py's splits, finetune/)


def dataset_file(path):
    """The dataset file `path` names: the file itself, or a folder's dataset.json; UserError otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, DATASET_FILE)
        if not os.path.isfile(inside):
            raise UserError(f"dataset folder {path} holds no {DATASET_FILE}; expected a dataset.json file or a "
                            "folder holding one")
        return inside
    if not os.path.isfile(path):
        raise UserError(f"dataset file not found: {path}")
    return path


def read_dataset_json(path, require_label=False, image_root=None):
    """The samples of a finetuning `dataset.json` (spec §15.1; or the folder holding it) as a list of
    `FinetuneSample`.

    The file is a UTF-8 JSON list of objects `{"img": path, "prompt": question, "label": answer}` (a `.jsonl`
    file: one object per line). Objects without those keys are read like MindFormers does, by the first three
    values in order. Image paths are resolved relative to `image_root` (default: the json file's folder;
    falling back to the current directory when only that has the file) and must stay inside it, also through
    symlinks. A file that is not UTF-8 or is malformed raises a UserError naming where (line, byte offset or
    entry, and field). With `require_label` (finetuning) an entry whose label is missing or blank is such an
    error too: it would train the model to answer nothing."""
    path = dataset_file(path)
    text = _read_text(path)
    root = _image_root(image_root, path)
    entries = []
    if path.endswith(".jsonl"):
        for lineno, line in enumerate(text.split("\n"), 1):   # not splitlines(): a JSON string may hold U+2028
            if not line.strip():
                continue
            try:
                entries.append((f"{path} line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {lineno} column {err.colno}: invalid JSON ({err.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") \
                from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of {{\"img\", \"prompt\", \"label\"}} objects, got a "
                            f"{type(data).__name__}")
        entries = [(f"{path} entry {i} (counting from 0)", entry) for i, entry in enumerate(data)]
    if not entries:
        raise UserError(f"{path} holds no samples")
    # Every entry's text is checked before any image path: what the file itself gets wrong comes first,
    # whatever the image folders hold.
    fields = [(where, *_entry_fields(entry, where)) for where, entry in entries]
    if require_label:
        for where, _, _, label in fields:
            if not label.strip():
                raise UserError(f"{where}: no label (the answer to train on is missing or empty); give every "
                                f"entry a non-empty \"label\" or remove the entry")
    return [FinetuneSample(_resolve_image(img, root, where), prompt, label) for where, img, prompt, label in fields]


def check_images(samples):
    """Raise one UserError naming every missing or unreadable image of `samples` (the first ten, then a
    count), before any training starts. Each image is opened, verified (PIL `verify`) and decoded."""
    problems = []
    seen = set()
    for sample in samples:
        img = sample[0] if isinstance(sample, (tuple, list)) else sample
        if img in seen:
            continue
        seen.add(img)
        if not os.path.isfile(img):
            problems.append(f"{img}: not found")
            continue
        try:
            with Image.open(img) as im:
                im.verify()
            load_image(img)
        except UserError as err:
            problems.append(str(err))
        except Exception as err:  # pylint: disable=broad-except  # PIL raises many types on corrupt data
            problems.append(f"{img}: not a readable image ({type(err).__name__}: {err})")
    if problems:
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  and {more} more" if more else "")
        raise UserError(f"{len(problems)} image(s) of the dataset are missing or unreadable:\n  {lines}")


# ---------------------------------------------------------------------------------------------- samples
def _check_int(name, value, minimum):
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class SampleBuilder:
    """Builds training samples (spec §15.2); `build_sample` is the one-call form.

    Args:
        processor: a VisualGLMProcessor, or a ChatGLM tokenizer (a processor is then made from `config`).
        image_processor: a VisualGLMImageProcessor; default the processor's, else one from `config`.
        max_source_length: the prompt part is truncated to max_source_length - 1 tokens (never into the
            image slots: a prompt that would lose them, or all of the text after them, is an error).
        max_target_length: the label is truncated to max_target_length - 2 tokens (with a warning).
        config: a VisualGLMConfig: the special-token ids (`text_config`), image_length and placeholder id.
            May be None when `processor` is a VisualGLMProcessor (ids then come from its tokenizer).
    """

    def __init__(self, processor, image_processor, max_source_length, max_target_length, config=None):
        if not isinstance(processor, VisualGLMProcessor):
            if config is None:
                raise UserError("build_sample needs a VisualGLMConfig when given a tokenizer instead of a "
                                "VisualGLMProcessor")
            processor = VisualGLMProcessor.from_config(config, processor, image_processor)
        tokenizer = processor.tokenizer
        if config is not None:
            text = config.text_config
            ids = dict(bos=text.bos_token_id, eos=text.eos_token_id, gmask=text.gmask_token_id,
                       mask=text.mask_token_id, pad=text.pad_token_id)
            if processor.image_length != config.image_length:
                raise UserError(f"the processor has {processor.image_length} image slots but the model config "
                                f"{config.image_length}")
            if processor.placeholder_id != config.image_placeholder_id:
                raise UserError(f"the processor's image placeholder id {processor.placeholder_id} differs from "
                                f"the config's {config.image_placeholder_id}")
        else:
            ids = dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, gmask=tokenizer.gmask_token_id,
                       mask=tokenizer.mask_token_id, pad=tokenizer.pad_token_id)
        theirs = dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, gmask=tokenizer.gmask_token_id)
        wrong = [f"{k} {theirs[k]} vs {ids[k]}" for k in theirs if theirs[k] != ids[k]]
        if wrong:
            raise UserError("the tokenizer's special-token ids differ from the model config's "
                            f"({', '.join(wrong)}): use the tokenizer the model was built for")
        self.processor = processor
        self.image_processor = image_processor or processor.image_processor or (
            VisualGLMImageProcessor.from_config(config) if config is not None else VisualGLMImageProcessor())
        self.ids = ids
        self.image_length = processor.image_length
        pre_text = build_prompt("", with_image=True)[0]
        self.image_start = len(processor._encode(pre_text))  # pylint: disable=protected-access
        self.max_source_length = _check_int("max_source_length", max_source_length, 1)
        self.max_target_length = _check_int("max_target_length", max_target_length, 2)
        self.seq_length = self.max_source_length + self.max_target_length
        self._warned = set()

    def _warn(self, name, what, message):
        if (name, what) not in self._warned:
            self._warned.add((name, what))
            warnings.warn(message, UserWarning, stacklevel=3)

    def source_length(self, prompt):
        """The smallest max_source_length that keeps `prompt` whole: its ids up to and with [gMASK]."""
        return len(self.processor.build_input_ids(prompt)[0]) - 1

    def target_length(self, label):
        """The smallest max_target_length that keeps `label` whole: <sop>, its ids and <eop>."""
        return len(self.processor._encode(label)) + 2  # pylint: disable=protected-access

    def token_ids(self, prompt, label, name="sample"):
        """`(input_ids, context_length, image_start)`: the unpadded ids `a + [gMASK, <sop>] + b + [<eop>]`
        and the index of <sop>. `name` identifies the sample in errors and warnings."""
        ids = self.ids
        full, image_start = self.processor.build_input_ids(prompt)
        if full[-2:] != [ids["gmask"], ids["bos"]]:
            raise RuntimeError("VisualGLMProcessor.build_input_ids did not end with [gMASK], <sop>")
        if image_start != self.image_start:
            raise RuntimeError(f"image_start {image_start} differs from the measured {self.image_start}")
        a_ids = full[:-2]
        slots_end = image_start + self.image_length
        keep = self.max_source_length - 1
        if len(a_ids) > keep:
            # never cut into the image slots, and keep at least one token of the text after them
            if keep <= slots_end:
                raise UserError(f"{name}: the prompt does not fit: it takes {len(a_ids)} tokens ({slots_end} for "
                                f"<img> and the {self.image_length} image slots) but only max_source_length - 1 = "
                                f"{keep} are kept, which would cut the image slots or all of the text after them; "
                                f"raise max_source_length to at least {slots_end + 2} (better: "
                                f"{len(a_ids) + 1}) or shorten the prompt")
            self._warn(name, "prompt", f"{name}: the prompt takes {len(a_ids)} tokens; truncated to "
                                       f"max_source_length - 1 = {keep}")
            a_ids = a_ids[:keep]
        b_ids = self.processor._encode(label)  # pylint: disable=protected-access
        if len(b_ids) > self.max_target_length - 2:
            self._warn(name, "label", f"{name}: the label takes {len(b_ids)} tokens; truncated to "
                                      f"max_target_length - 2 = {self.max_target_length - 2}")
            b_ids = b_ids[:self.max_target_length - 2]
        structural = {ids["bos"]: "<sop>", ids["gmask"]: "[gMASK]"}
        for part, part_ids, extra in (("prompt", a_ids, {}), ("label", b_ids, {ids["eos"]: "<eop>"})):
            found = sorted({(structural | extra)[t] for t in part_ids if t in structural or t in extra})
            if found:
                raise UserError(f"{name}: the {part} contains the special token(s) {', '.join(found)}, which would "
                                f"break the sample layout; remove them from the text")
        input_ids = a_ids + [ids["gmask"], ids["bos"]] + b_ids + [ids["eos"]]
        return input_ids, len(a_ids) + 1, image_start

    def text_sample(self, prompt, label, name="sample"):
        """The columns of one sample except `image`."""
        return self.columns(*self.token_ids(prompt, label, name))

    def columns(self, input_ids, context_length, image_start):
        """The non-image columns from the output of `token_ids`."""
        seq, n = self.seq_length, len(input_ids)
        ids = self.ids
        padded = np.full((seq,), ids["pad"], np.int32)
        padded[:n] = input_ids
        labels = np.full((seq,), IGNORE_INDEX, np.int32)
        labels[context_length:n] = input_ids[context_length:]
        positions, mask = glm_position_ids_and_mask(np.asarray([input_ids]), ids["bos"], ids["gmask"],
                                                    ids["mask"], length=seq)
        return {"input_ids": padded, "labels": labels, "position_id": positions[0].astype(np.int32),
                "attention_mask": mask.astype(bool), "image_start": np.array(image_start, np.int32)}

    def pixels(self, img):
        """`[3, S, S]` float32 pixels of an image path, PIL image, array or bytes."""
        return np.asarray(self.image_processor.preprocess_one(img), np.float32)

    def __call__(self, img, prompt, label, name="sample"):
        sample = {"image": self.pixels(img)}
        sample.update(self.text_sample(prompt, label, name))
        return {key: sample[key] for key in COLUMN_NAMES}


def build_sample(processor, image_processor, img, prompt, label, max_source_length, max_target_length, config,
                 name="sample"):
    """One training sample (spec §15.2) as a dict with the keys `COLUMN_NAMES` in that order.

    `a = encode("<img>") + [placeholder] * image_length + encode("</img>问：" + prompt + "\\n答：")` (no special
    tokens; the layout of `VisualGLMProcessor.build_input_ids`), cut to max_source_length - 1 tokens;
    `b = encode(label)` cut to max_target_length - 2 (warning); `input_ids = a + [gMASK, <sop>] + b + [<eop>]`
    right-padded with pad to max_source_length + max_target_length. See the module docstring for the columns.
    `processor` may be a VisualGLMProcessor or a tokenizer; `name` names the sample in errors and warnings."""
    builder = SampleBuilder(processor, image_processor, max_source_length, max_target_length, config)
    return builder(img, prompt, label, name)


# ---------------------------------------------------------------------------------------------- sources
class SFTDataset:
    """Random-access source: row i of `samples` as a tuple in `COLUMN_NAMES` order (MindFormers' SFTDataSet).

    Args:
        samples: FinetuneSample / (image, prompt, label) tuples, e.g. from `read_dataset_json`.
        processor, config, max_source_length, max_target_length, image_processor: as in `SampleBuilder`.
        image_cache_size: how many images' pixel arrays to keep (least recently used dropped).
        prepare: tokenize every row now, so that a prompt that does not fit fails (and over-long labels
            warn) before training rather than mid-run.
    """

    def __init__(self, samples, processor, config, max_source_length=64, max_target_length=256,
                 image_processor=None, image_cache_size=256, prepare=True):
        self.samples = [FinetuneSample(*sample) for sample in samples]
        if not self.samples:
            raise UserError("the finetuning dataset is empty")
        self.builder = SampleBuilder(processor, image_processor, max_source_length, max_target_length, config)
        self.image_cache_size = int(image_cache_size)
        self._pixels = OrderedDict()
        self._tokens = {}
        if prepare:
            for row in range(len(self.samples)):
                self._token_ids(row)

    def _token_ids(self, row):
        tokens = self._tokens.get(row)
        if tokens is None:  # the ids only: the [1, L, L] masks would take L*L bytes per row
            img, prompt, label = self.samples[row]
            tokens = self._tokens[row] = self.builder.token_ids(prompt, label, name=f"sample {row} ({img})")
        return tokens

    def __len__(self):
        return len(self.samples)

    def _row(self, index):
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        return index % len(self)

    def _image(self, path):
        cached = self._pixels.get(path)
        if cached is not None:
            self._pixels.move_to_end(path)
            return cached
        pixels = self.builder.pixels(path)
        pixels.setflags(write=False)
        if self.image_cache_size > 0:
            self._pixels[path] = pixels
            while len(self._pixels) > self.image_cache_size:
                self._pixels.popitem(last=False)
        return pixels

    def sample(self, index):
        """Row `index` as a dict (keys `COLUMN_NAMES`)."""
        row = self._row(index)
        out = {"image": self._image(self.samples[row].image)}
        out.update(self.builder.columns(*self._token_ids(row)))
        return {key: out[key] for key in COLUMN_NAMES}

    def __getitem__(self, index):
        sample = self.sample(index)
        return tuple(sample[key] for key in COLUMN_NAMES)


def random_mapping_index(index, n):
    """The row MindFormers' SFTRandomMappingDataSet returns for item `index` of a dataset of n rows:
    16 draws `randint(0, 2**32 - 1)` of `random.Random(index)` seed a `numpy.random.RandomState`, whose
    `randint(n)` is the row (sampling with replacement, reproducible per index)."""
    py_rng = random.Random(index)
    seeds = [py_rng.randint(0, 2 ** 32 - 1) for _ in range(16)]
    return int(np.random.RandomState(seed=seeds).randint(n))


class RandomMappingDataset:
    """`len(source) * scale` items; item `index` is row `random_mapping_index(index, len(source))`."""

    def __init__(self, source, scale=1):
        self.source = source
        self.scale = _check_int("dataset scale", scale, 1)
        if len(source) == 0:
            raise UserError("the finetuning dataset is empty")

    def __len__(self):
        return len(self.source) * self.scale

    def row(self, index):
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        return random_mapping_index(index, len(self.source))

    def __getitem__(self, index):
        return self.source[self.row(index)]


def dataset_scale(num_iters, batch_size, data_parallel, n):
    """`num_iters * batch_size * data_parallel // n + 1` (spec §15.5): enough random-mapping items for
    num_iters steps of every data-parallel rank."""
    if n <= 0:
        raise UserError("the finetuning dataset is empty")
    return int(num_iters) * int(batch_size) * int(data_parallel) // int(n) + 1


def _distributed():
    """(rank, group size) of an initialised mindspore.communication, else (0, 1)."""
    try:
        from mindspore.communication.management import GlobalComm, get_group_size, get_rank
    except ImportError:
        return 0, 1
    if not GlobalComm.INITED:
        return 0, 1
    return get_rank(), get_group_size()


def build_finetune_dataset(data, processor, config, batch_size, *, max_source_length=64, max_target_length=256,
                           random_mapping=True, scale=None, num_iters=None, data_parallel=None, rank_id=None,
                           rank_size=None, image_processor=None, check=True, drop_remainder=True,
                           image_cache_size=256, image_root=None):
    """The finetuning `GeneratorDataset`, batched: columns `COLUMN_NAMES` (ints int32, mask bool, image
    float32), `batch_size` rows per batch (per rank).

    Args:
        data: a dataset.json path, or a list of (image, prompt, label) samples.
        processor: a VisualGLMProcessor or the tokenizer; config: the VisualGLMConfig.
        random_mapping: sample rows with replacement, reproducibly per item (spec §15.5); else each row once.
        scale: random-mapping length factor; default `dataset_scale(num_iters, batch_size, data_parallel, N)`
            when num_iters is given, else 1.
        data_parallel: ranks in the scale formula; default rank_size.
        rank_id, rank_size: shard of this process; default from an initialised mindspore.communication.
        check: check every image file before building (`check_images`).
        image_root: the folder a dataset.json's image paths are resolved against and confined to (default: its
            folder).
    """
    samples = read_dataset_json(data, image_root=image_root) if isinstance(data, (str, os.PathLike)) else \
        [FinetuneSample(*sample) for sample in data]
    if check:
        check_images(samples)
    batch_size = _check_int("batch_size", batch_size, 1)
    if rank_id is None or rank_size is None:
        auto_rank, auto_size = _distributed()
        rank_id = auto_rank if rank_id is None else rank_id
        rank_size = auto_size if rank_size is None else rank_size
    rank_size = _check_int("rank_size", rank_size, 1)
    rank_id = _check_int("rank_id", rank_id, 0)
    if rank_id >= rank_size:
        raise UserError(f"rank_id {rank_id} must be < rank_size {rank_size}")
    source = SFTDataset(samples, processor, config, max_source_length, max_target_length, image_processor,
                        image_cache_size)
    if random_mapping:
        if scale is None:
            if num_iters is not None:
                dp = rank_size if data_parallel is None else data_parallel
                scale = dataset_scale(num_iters, batch_size, dp, len(source))
                logger.info("dataset scale: %d = %d * %d * %d // %d + 1", scale, num_iters, batch_size, dp,
                            len(source))
            else:
                scale = 1
        source = RandomMappingDataset(source, scale)
    elif scale not in (None, 1):
        raise UserError("scale needs random_mapping=True")
    per_rank = -(-len(source) // rank_size)
    if drop_remainder and per_rank < batch_size:
        raise UserError(f"the dataset gives {per_rank} sample(s) per rank, fewer than batch_size {batch_size}: no "
                        f"batch would be produced (raise the scale or num_iters, or lower batch_size)")
    import mindspore.dataset as msds  # pylint: disable=import-outside-toplevel
    shards = dict(num_shards=rank_size, shard_id=rank_id) if rank_size > 1 else {}
    dataset = msds.GeneratorDataset(source, column_names=list(COLUMN_NAMES), shuffle=False,
                                    num_parallel_workers=1, python_multiprocessing=False, **shards)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)
