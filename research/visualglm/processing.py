"""Inputs of VisualGLM-6B: the image processor (spec §12), the prompt templates (spec §11), the prompt
token layout with its image slots (spec §9.1) and `process_response` (spec §13.2).

The processors are plain classes registered with MindFormers (MindFormerModuleType.PROCESSOR): MindFormers'
`ProcessorMixin` only accepts tokenizer classes that live inside the `mindformers` package.
"""
import io
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from visualglm.errors import UserError

__all__ = ["CLIP_MEAN", "CLIP_STD", "VisualGLMImageProcessor", "VisualGLMProcessor", "build_prompt",
           "load_image", "process_response"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _describe(image):
    if isinstance(image, (str, os.PathLike)):
        return f"image file {os.fspath(image)}"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(image)} bytes)"
    if isinstance(image, np.ndarray):
        return f"image array of shape {image.shape} and dtype {image.dtype}"
    return f"image {type(image).__name__}"


def _to_rgb(img, name):
    """Any PIL mode to RGB. 16-bit grey images are scaled to 8 bits (PIL's own conversion would clip them)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and np.asarray(img).max(initial=0) > 255):
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8))   # [H, W] uint8: L
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA images":
            # the alpha is dropped either way, as upstream does.
            warnings.simplefilter("ignore", UserWarning)
            return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise UserError(f"{name}: unsupported image mode {img.mode!r} ({err})") from None


def _from_array(array, name):
    if array.dtype != np.uint8:
        raise UserError(f"{name}: expected a uint8 array (HxW or HxWxC with C in 1, 3, 4)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))  # uint8: L, RGB or RGBA
    raise UserError(f"{name}: expected a uint8 array (HxW or HxWxC with C in 1, 3, 4)")


def load_image(image):
    """An RGB PIL image from a file path, a PIL image, a uint8 numpy array (HWC, RGB/RGBA, or HW grey) or
    the bytes of an encoded image file. The EXIF orientation is applied (ImageOps.exif_transpose)."""
    name = _describe(image)
    if isinstance(image, np.ndarray):
        return _to_rgb(_from_array(image, name), name)
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path):
                raise UserError(f"{name}: URLs are not supported, download the image and pass the file")
            if os.path.isdir(path):
                raise UserError(f"{name} is a folder; expected an image file")
            if not os.path.isfile(path):
                raise UserError(f"{name} not found")
            source = path
        else:
            source = io.BytesIO(bytes(image))
        try:
            img = Image.open(source)
            img.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UserError(f"{name} is not a readable image: {err}") from None
    else:
        raise UserError(f"unsupported {name}: pass a file path, PIL image, uint8 numpy array or bytes")
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as err:
        raise UserError(f"{name}: bad EXIF data ({err})") from None
    return _to_rgb(img, name)


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class VisualGLMImageProcessor:
    """Eval preprocessing of BLIP-2/VisualGLM: RGB, resize to image_size x image_size with PIL bicubic
    (aspect ratio not kept, no crop), /255, CLIP mean/std normalisation, CHW float32.

    `__call__(images)` takes one image, a list, or an [N, H, W, C] uint8 array and returns `[N, 3, S, S]` float32 (numpy, or a MindSpore
    tensor with `return_tensors="ms"`)."""

    def __init__(self, image_size=224, mean=CLIP_MEAN, std=CLIP_STD, **kwargs):
        kwargs.pop("type", None)
        if kwargs:
            raise TypeError(f"VisualGLMImageProcessor got unexpected arguments {sorted(kwargs)}")
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                raise ValueError(f"VisualGLM uses square images, got image_size {image_size}")
            image_size = image_size[0]
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    @classmethod
    def from_config(cls, config):
        """From a VisualGLMConfig (its vision_config.image_size) or a ViTConfig."""
        vision = getattr(config, "vision_config", config)
        return cls(image_size=vision.image_size)

    def preprocess_one(self, image):
        """One image as a [3, S, S] float32 array."""
        img = load_image(image)
        size = self.image_size
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return (pixels - self.mean) / self.std

    def __call__(self, images, return_tensors=None):
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if isinstance(images, (list, tuple)):
            if not images:
                raise UserError("no image given")
            batch = np.stack([self.preprocess_one(image) for image in images])
        else:
            batch = self.preprocess_one(images)[None]
        if return_tensors == "ms":
            import mindspore as ms
            return ms.Tensor(batch, ms.float32)
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be None, 'np' or 'ms', got {return_tensors!r}")
        return batch

    preprocess = __call__

    def __repr__(self):
        return f"VisualGLMImageProcessor(image_size={self.image_size})"


def build_prompt(query, history=(), english=False, with_image=True):
    """The prompt around the image slots (spec §11): `(pre, post)`. The image slots go between the two.

    pre is "<img>" (or "" for a text-only prompt); post is "</img>" (image prompts only), then each
    history turn `问：{q}\\n答：{r}\\n` and the query `问：{query}\\n答：`, or `Q:{q}\\nA:{r}\\n` and `Q:{query}\\nA:`
    in English mode."""
    q_tag, a_tag = ("Q:", "A:") if english else ("问：", "答：")
    turns = []
    for turn in history or ():
        if len(turn) != 2:
            raise UserError(f"each history turn must be a (query, response) pair, got {turn!r}")
        turns.append(f"{q_tag}{turn[0]}\n{a_tag}{turn[1]}\n")
    text = "".join(turns) + f"{q_tag}{query}\n{a_tag}"
    if with_image:
        return "<img>", "</img>" + text
    return "", text


_CJK = "\u4e00-\u9fff"
_PUNCT_PAIRS = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))


def process_response(text, english=False):
    """Clean a decoded answer (spec §13.2): strip, `[[训练时间]]` -> `2023年`, ASCII , ! : ; ? next to a CJK
    character -> full width, then keep the text after the last `答：` (`A:` in English mode), stripped.

    English mode also splits on `A：`, which the full-width step itself makes of `A:` before a CJK character
    (upstream then fails to cut the prompt off)."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full in _PUNCT_PAIRS:
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([{_CJK}]){mark}", rf"\g<1>{full}", text)
        text = re.sub(rf"{mark}([{_CJK}])", rf"{full}\g<1>", text)
    if english:
        return re.split("A[:：]", text)[-1].strip()
    return text.split("答：")[-1].strip()


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class VisualGLMProcessor:
    """Builds the model inputs of one query (spec §9.1):

    `input_ids = encode(pre) + [placeholder] * image_length + encode(post) + [gMASK, <sop>]`, each text piece
    encoded without special tokens; `image_start = len(encode(pre))` (measured, 3 with ice_text). A text-only
    query has no slots and no `<img></img>`.

    Args:
        tokenizer: a ChatGLMTokenizer (anything with `encode(text, add_special_tokens=False)` and
            `build_inputs_with_special_tokens`).
        image_processor: a VisualGLMImageProcessor (needed only for queries with an image).
        image_length: number of image slots (= Q-Former queries, 32).
        placeholder_id: the id filling the slots; default the tokenizer's pad id (THUDM).
        english_template: `english=True` means upstream's English template `Q:…\nA:` (True, default); False for a
            model that knows the Chinese template only (VisualGLMConfig.english_template), whose prompts and
            answers then use `问：…\n答：` whatever the language.
    """

    def __init__(self, tokenizer, image_processor=None, image_length=32, placeholder_id=None, english_template=True,
                 **kwargs):
        kwargs.pop("type", None)
        if kwargs:
            raise TypeError(f"VisualGLMProcessor got unexpected arguments {sorted(kwargs)}")
        if tokenizer is None:
            raise UserError("VisualGLMProcessor needs a tokenizer")
        if isinstance(image_processor, dict):
            image_processor = VisualGLMImageProcessor(**image_processor)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_length = int(image_length)
        self.placeholder_id = tokenizer.pad_token_id if placeholder_id is None else int(placeholder_id)
        self.english_template = bool(english_template)

    @classmethod
    def from_config(cls, config, tokenizer, image_processor=None):
        """From a VisualGLMConfig: its image_length, image_placeholder_id, english_template and vision
        image_size."""
        if image_processor is None:
            image_processor = VisualGLMImageProcessor.from_config(config)
        placeholder = getattr(config, "image_placeholder_id", None)
        if placeholder is None:
            placeholder = config.text_config.pad_token_id
        return cls(tokenizer, image_processor, image_length=config.image_length, placeholder_id=placeholder,
                   english_template=getattr(config, "english_template", True))

    def _encode(self, text):
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def build_input_ids(self, query, history=(), english=False, with_image=True):
        """`(input_ids, image_start)`; image_start is None for a text-only prompt."""
        pre, post = build_prompt(query, history, english=english and self.english_template, with_image=with_image)
        pre_ids, post_ids = self._encode(pre), self._encode(post)
        if with_image:
            ids = pre_ids + [self.placeholder_id] * self.image_length + post_ids
            image_start = len(pre_ids)
        else:
            ids, image_start = pre_ids + post_ids, None
        return list(self.tokenizer.build_inputs_with_special_tokens(ids)), image_start

    def __call__(self, query, image=None, history=(), english=False, with_image=None, return_tensors=None):
        """Inputs of one query: a dict with `input_ids` (list of int), `image_start` (int, None for
        text-only), `image_length` (0 for text-only) and `pixel_values` ([1, 3, S, S] float32, None without
        an image). `with_image` defaults to `image is not None`; `with_image=True` without an image builds the
        slots only (the caller supplies the image embeddings)."""
        if with_image is None:
            with_image = image is not None
        if image is not None and not with_image:
            raise UserError("an image was given for a text-only prompt (with_image=False)")
        input_ids, image_start = self.build_input_ids(query, history, english=english, with_image=with_image)
        pixel_values = None
        if image is not None:
            if self.image_processor is None:
                raise UserError("VisualGLMProcessor has no image_processor to process the image")
            pixel_values = self.image_processor(image, return_tensors=return_tensors)
        return {"input_ids": input_ids, "image_start": image_start,
                "image_length": self.image_length if with_image else 0, "pixel_values": pixel_values}

    def decode_response(self, output_ids, english=False):
        """Decode a generated sequence (prompt included, as MindFormers returns it) and clean it with
        `process_response`."""
        return process_response(self.tokenizer.decode(output_ids), english=english and self.english_template)

    def __repr__(self):
        return (f"VisualGLMProcessor(tokenizer={type(self.tokenizer).__name__}, image_processor="
                f"{self.image_processor!r}, image_length={self.image_length}, placeholder_id={self.placeholder_id})")
