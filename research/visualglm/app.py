"""What the inference scripts share: from a yaml and parsed arguments (cli.add_*_args) to the device context,
config, tokenizer, processor, model and VisualGLMChat engine; the inputs (jsonl, repeated or legacy
comma-separated --image_path/--prompt pairs) checked before any model is built; the Response line.

Relative image, input-file, checkpoint and vocabulary paths are looked up in the working directory, then in
the repository root, so the README's commands work from the root and from research/visualglm/.
"""
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

from visualglm.errors import UserError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(PACKAGE_DIR))
DEFAULT_CONFIG = os.path.join(PACKAGE_DIR, "run_visualglm_6b_image_to_text_generation.yaml")
DEFAULT_IMAGE = "examples/red_circle.png"
DEFAULT_PROMPT = "描述这张图片。"
DEVICE_TARGETS = {"cpu": "CPU", "ascend": "Ascend"}


def resolve_path(path, *folders):
    """`path` if it exists (absolute or relative to the working directory), else the first existing
    `folder/path` for a relative path; None when there is none."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path):
        return path
    if not os.path.isabs(path):
        for folder in folders:
            candidate = os.path.join(folder, path)
            if os.path.exists(candidate):
                return candidate
    return None


def _first_line(err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_yaml(config_path):
    """MindFormerConfig of a yaml; any parse or validation error is one UserError line (position included)."""
    from mindformers.tools.register import MindFormerConfig
    try:
        return MindFormerConfig(config_path)
    except Exception as err:  # noqa: BLE001 - any parse error of a user file is a one-line message
        detail = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"cannot read the config {config_path}: {detail}") from None


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Sample:
    """One question: an image path (None for text-only) and a prompt."""
    image: Optional[str]
    prompt: str
    id: object = None


def read_text_lines(path, what):
    """The lines of a UTF-8 text file; UserError naming the line of the first byte that is not UTF-8, or why
    the file cannot be read (`what` names the option)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{what}: file not found: {path}") from None
    except OSError as err:
        raise UserError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data    # a byte-order mark is allowed
    try:
        return body.decode("utf-8").split("\n")    # not splitlines(): a JSON string may hold U+2028
    except UnicodeDecodeError as err:
        line = body[:err.start].count(b"\n") + 1
        raise UserError(f"{what}: {path} line {line} is not UTF-8 text (byte 0x{body[err.start]:02x}); save the file "
                        "as UTF-8") from None


def read_jsonl(path):
    """Samples of a jsonl file: {"id": ..., "text" (or "prompt"): "...", "image": "path" or null} per line."""
    samples = []
    folder = os.path.dirname(os.path.abspath(path))
    for number, line in enumerate(read_text_lines(path, "--input_file"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get("text", record.get("prompt"))
        if not isinstance(prompt, str):
            raise UserError(f'{path}:{number}: needs a "text" string (the question)')
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise UserError(f'{path}:{number}: "image" must be a path or null')
        if image is not None and not os.path.isabs(image) and resolve_path(image, REPO_ROOT) is None \
                and os.path.exists(os.path.join(folder, image)):
            image = os.path.join(folder, image)   # relative to the jsonl file itself
        samples.append(Sample(image, prompt, record.get("id", number)))
    if not samples:
        raise UserError(f"{path}: no inputs")
    return samples


def collect_samples(args):
    """The questions of the command line, images resolved and checked (all of them, before any model is
    built): a jsonl --input_file, or --image_path/--prompt pairs."""
    if getattr(args, "input_file", None):
        if args.image_path or args.prompt:
            raise UserError("give either --input_file or --image_path/--prompt, not both")
        path = resolve_path(args.input_file, REPO_ROOT)
        if path is None or not os.path.isfile(path):
            raise UserError(f"input file not found: {args.input_file}")
        samples = read_jsonl(path)
    else:
        images = list(args.image_path or [DEFAULT_IMAGE])
        prompts = list(args.prompt or [])
        if len(images) == 1 and "," in images[0] and resolve_path(images[0], REPO_ROOT) is None:
            # The MindFormers scripts' form: --image_path "a.jpg,b.jpg" --prompt "q1,q2".
            images = [part.strip() for part in images[0].split(",") if part.strip()]
            if len(prompts) == 1 and len(prompts[0].split(",")) == len(images):
                prompts = [part.strip() for part in prompts[0].split(",")]
        if not prompts:
            prompts = [DEFAULT_PROMPT] * len(images)
        elif len(prompts) == 1:
            prompts = prompts * len(images)
        if len(prompts) != len(images):
            raise UserError(f"{len(images)} images but {len(prompts)} prompts: give one --prompt per --image_path, "
                            "or a single --prompt for every image")
        samples = [Sample(image, prompt, number) for number, (image, prompt) in enumerate(zip(images, prompts), 1)]
    check_images(samples)
    return samples


def lora_checkpoint_path(text, option="--lora_checkpoint"):
    """The LoRA checkpoint file `text` names (looked up like the other inputs), checked before the model is
    built; UserError when it is missing or not a MindSpore checkpoint."""
    from visualglm.modeling import check_checkpoint_file
    path = resolve_path(text, REPO_ROOT)
    if path is None or not os.path.isfile(path):
        raise UserError(f"LoRA checkpoint not found: {text}")
    check_checkpoint_file(path, f"the LoRA checkpoint ({option})")
    return path


def check_images(samples):
    """Resolve every image path and decode it once; all problems in one UserError."""
    from visualglm.processing import load_image
    problems, checked = [], {}
    for sample in samples:
        if sample.image is None:
            continue
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", sample.image):
            problems.append(f"image {sample.image}: URLs are not supported, download the image and pass the file")
            continue
        resolved = resolve_path(sample.image, REPO_ROOT)
        if resolved is None:
            places = " and ".join(dict.fromkeys([os.getcwd(), REPO_ROOT]))
            problems.append(f"image file {sample.image} not found (looked in {places})")
            continue
        if resolved not in checked:
            try:
                load_image(resolved)
                checked[resolved] = None
            except UserError as err:
                checked[resolved] = str(err)
            if checked[resolved]:
                problems.append(checked[resolved])
        sample.image = resolved
    if problems:
        raise UserError("; ".join(dict.fromkeys(problems)))


def check_arguments(args):
    """Checks that need no file: positive sizes, a known --device_target, valid generation options."""
    for name in ("batch_size", "seq_length", "generate_repeat_time", "max_length", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if args.device_target is not None:
        device_target_of(args.device_target)
    if args.device_id < 0:
        raise UserError(f"--device_id must be >= 0, got {args.device_id}")
    generation_config(args, None)


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class RunSettings:
    """Everything the yaml and the arguments decide, checked before the model is built."""
    config_path: str
    yaml: object                # MindFormerConfig
    config: object              # VisualGLMConfig
    device_target: str
    device_id: int
    vocab_file: str
    tokenizer_kwargs: dict
    image_processor_kwargs: Optional[dict]
    checkpoints: dict           # part -> path, as load_weights takes them
    seed: Optional[int]
    max_device_memory: Optional[str] = None
    skipped: list = field(default_factory=list)   # yaml checkpoints not used because --checkpoint replaces them


def _section(node):
    if node is None:
        return {}
    return node.to_dict() if hasattr(node, "to_dict") else dict(node)


def device_target_of(value):
    target = DEVICE_TARGETS.get(str(value).strip().lower())
    if target is None:
        raise UserError(f"unknown device target {value!r}: expected CPU or Ascend")
    return target


def load_settings(args):
    """Read the yaml, apply the arguments, check that checkpoints and tokenizer file exist."""
    from visualglm.configuration import load_config
    from visualglm.modeling import configured_checkpoints

    config_path = resolve_path(args.config, PACKAGE_DIR, REPO_ROOT)
    if config_path is None or not os.path.isfile(config_path):
        raise UserError(f"config file not found: {args.config}")
    yaml = read_yaml(config_path)
    if not _section(_section(yaml.get("model")).get("model_config")):
        raise UserError(f"the config {config_path} has no model.model_config section (expected a MindFormers "
                        "yaml like run_visualglm_6b_image_to_text_generation.yaml)")
    context = _section(yaml.get("context"))
    target = device_target_of(args.device_target or context.get("device_target") or "CPU")

    overrides = dict(batch_size=args.batch_size, text_config=dict(use_past=args.use_past))
    if args.seq_length is not None:
        overrides["text_config"]["seq_length"] = args.seq_length
    compute_dtype = args.compute_dtype or ("float32" if target == "CPU" else None)
    if compute_dtype:
        overrides["compute_dtype"] = compute_dtype
    if getattr(args, "quantization_bit", None) is not None:
        overrides["quantization_bit"] = args.quantization_bit
    try:
        config = load_config(config_path, **overrides)
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"bad model config in {config_path}: {_first_line(err)}") from None
    if config.quantization_bit and target != "CPU":
        # MindSpore has no weight-only int8/int4 matmul on Ascend (mindspore-gs quantizes for its own runtime).
        raise UserError(f"quantization_bit {config.quantization_bit} is CPU-only for now: run with --device_target "
                        "CPU, or use --quantization_bit 0 on Ascend")

    problems, skipped = [], []
    holders = {"vit": config.vision_config, "qformer": config, "glm": config.text_config}
    for holder in holders.values():
        path = getattr(holder, "checkpoint_name_or_path", None)
        if path:
            holder.checkpoint_name_or_path = resolve_path(path, REPO_ROOT) or path
    if args.checkpoint:
        checkpoint = resolve_path(args.checkpoint, REPO_ROOT)
        if checkpoint is None or not os.path.isfile(checkpoint):
            problems.append(f"checkpoint not found: {args.checkpoint} (--checkpoint)")
            checkpoint = args.checkpoint
        config.checkpoint_name_or_path = checkpoint
        parts = [part for part in ("vit", "glm") if getattr(holders[part], "checkpoint_name_or_path", None)]
        whole = os.path.isfile(checkpoint) and any(
            os.path.isfile(holders[p].checkpoint_name_or_path) for p in parts) and is_whole_model(checkpoint)
        for part in parts:
            path = holders[part].checkpoint_name_or_path
            if whole or not os.path.isfile(path):
                if not whole:
                    skipped.append(f"{part}: {path}")
                holders[part].checkpoint_name_or_path = None
    checkpoints = {}
    if not problems:
        try:
            checkpoints = configured_checkpoints(config)
        except UserError as err:
            problems.append(str(err))

    tokenizer_kwargs = _section(_section(yaml.get("processor")).get("tokenizer"))
    tokenizer_kwargs.pop("type", None)
    yaml_vocab = tokenizer_kwargs.pop("vocab_file", None)
    vocab = args.vocab_file or yaml_vocab
    vocab_file = resolve_path(vocab, REPO_ROOT) if vocab else None
    if vocab_file is None or not os.path.isfile(vocab_file):
        where = "--vocab_file" if args.vocab_file else f"processor.tokenizer.vocab_file in {config_path}"
        problems.append(f"tokenizer vocab file not found: {vocab} ({where}); pass --vocab_file or put the path "
                        "of VisualGLM-6B's ice_text.model in the yaml")
    if problems:
        raise UserError("; ".join(problems))

    image_processor = _section(_section(yaml.get("processor")).get("image_processor")) or None
    if image_processor:
        image_processor.pop("type", None)
    check_cache_fits(config.text_config, target, context.get("max_device_memory"))
    seed = args.seed if getattr(args, "seed", None) is not None else yaml.get("seed")
    return RunSettings(config_path=config_path, yaml=yaml, config=config, device_target=target,
                       device_id=args.device_id, vocab_file=vocab_file, tokenizer_kwargs=tokenizer_kwargs,
                       image_processor_kwargs=image_processor, checkpoints=checkpoints, seed=seed,
                       max_device_memory=context.get("max_device_memory"), skipped=skipped)


INT32_ROWS = 2 ** 31 - 1   # the cache is written by row index (int32)


def check_cache_fits(text_config, target, max_device_memory=None):
    """Before anything is allocated: the KV cache of batch_size × seq_length must be addressable and fit in the
    memory it lives in (this machine's available memory on the CPU, max_device_memory on a device when the
    yaml sets it). The message gives the largest seq_length that would fit."""
    if not text_config.use_past:
        return
    from visualglm.generation import PROMPT_BUCKET
    # a prefill step's attention scores (float32) and mask (bool) span the whole cache too
    prefill = text_config.batch_size * PROMPT_BUCKET * (text_config.num_heads * 4 + 1)
    per_position = text_config.kv_cache_bytes(1) + prefill
    limit = _memory_limit(target, max_device_memory)
    need = per_position * text_config.seq_length
    size = f"batch_size {text_config.batch_size} × seq_length {text_config.seq_length}"
    if text_config.kv_cache_rows > INT32_ROWS:
        longest = INT32_ROWS // (text_config.batch_size * text_config.num_heads)
        raise UserError(f"{size} is too long for the KV cache ({text_config.kv_cache_rows} rows per layer, at most "
                        f"{INT32_ROWS}): lower --seq_length (at most {longest} with this batch size) or --batch_size")
    if limit is not None and need > limit[0]:
        longest = limit[0] // per_position
        raise UserError(f"{size} needs {_gib(need)} for the KV cache and a prefill step, more than {limit[1]} "
                        f"({_gib(limit[0])}): lower "
                        f"--seq_length (at most {longest} would fit, less once the weights are loaded) or "
                        "--batch_size")


def check_training_fits(text_config, batch_size, length, target, max_device_memory=None):
    """Before the dataset is built: one training step of batch_size × length keeps, per GLM layer, float32
    attention scores [heads, length, length] for the backward pass, beside the bool masks of the samples.
    Refuse a length whose quadratic part alone cannot fit, naming the longest that would."""
    per_square = batch_size * (1 + 4 * text_config.num_heads * text_config.num_layers)
    limit = _memory_limit(target, max_device_memory)
    if limit is not None and per_square * length ** 2 > limit[0]:
        longest = math.isqrt(limit[0] // per_square)
        raise UserError(f"batch_size {batch_size} × max_source_length + max_target_length {length} needs "
                        f"{_gib(per_square * length ** 2)} for the attention of one training step, more than "
                        f"{limit[1]} ({_gib(limit[0])}): lower train_dataset.max_source_length / max_target_length "
                        f"(at most {longest} together would fit, less with the weights) or --batch_size")


def _memory_limit(target, max_device_memory):
    """(bytes, what) the KV cache must fit in, or None when unknown."""
    if target != "CPU":
        size = _parse_size(max_device_memory)
        return (size, "max_device_memory of the yaml's context") if size else None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024, "this machine's available memory"
    except (OSError, KeyError, ValueError):
        return None


def _parse_size(text):
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text or ""), re.I)
    if not match:
        return None
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def _gib(size):
    return f"{size / 2 ** 30:,.1f} GiB"


def is_whole_model(path):
    """Whether a checkpoint holds ViT and GLM parameters too (names only: nothing is kept in memory)."""
    from visualglm.modeling import read_checkpoint
    names = []
    read_checkpoint(path, choice_func=lambda name: names.append(name) and False)
    return any(n.startswith("visual_encoder.") for n in names) and any(n.startswith("llm_model.") for n in names)


# ----------------------------------------------------------------------------------------------- building
def set_device(target, device_id=0, max_device_memory=None):
    """GRAPH mode on the device (`ms.set_device`, the non-deprecated form of set_context(device_target=,
    device_id=)); max_device_memory only on Ascend."""
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.set_device(target, device_id)
    except RuntimeError as err:
        # Already running (main() called again in one process): fine if it is the same device.
        if "initialized" not in str(err) or ms.get_context("device_target") != target:
            raise UserError(f"device target {target} is not available: {_first_line(err)}") from None
    except ValueError as err:
        raise UserError(f"bad device {target}:{device_id}: {_first_line(err)}") from None
    if target == "Ascend" and max_device_memory:
        ms.runtime.set_memory(max_size=str(max_device_memory))


def build_tokenizer(settings):
    from visualglm.tokenization import ChatGLMTokenizer
    try:
        tokenizer = ChatGLMTokenizer(settings.vocab_file, **settings.tokenizer_kwargs)
    except TypeError as err:
        raise UserError(f"bad processor.tokenizer section in {settings.config_path}: {_first_line(err)}") from None
    text = settings.config.text_config
    wrong = [f"{name} {getattr(tokenizer, name)} (model {getattr(text, name)})"
             for name in ("bos_token_id", "eos_token_id", "gmask_token_id", "mask_token_id")
             if getattr(tokenizer, name) != getattr(text, name)]
    if tokenizer.vocab_size > text.vocab_size:
        wrong.append(f"vocab_size {tokenizer.vocab_size} (model {text.vocab_size})")
    if wrong:
        raise UserError(f"the tokenizer {settings.vocab_file} does not fit the model config {settings.config_path}: "
                        + ", ".join(wrong))
    return tokenizer


def build_image_processor(settings):
    from visualglm.processing import VisualGLMImageProcessor
    if not settings.image_processor_kwargs:
        return VisualGLMImageProcessor.from_config(settings.config)
    try:
        return VisualGLMImageProcessor(**settings.image_processor_kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad processor.image_processor section in {settings.config_path}: "
                        f"{_first_line(err)}") from None


def build_network(settings):
    """The model with its checkpoints loaded (no weight memory until then), in eval mode."""
    from visualglm.modeling import CheckpointMismatchError, build_model, load_weights
    model = build_model(settings.config, delay_init=True)
    try:
        load_weights(model, **settings.checkpoints)
    except CheckpointMismatchError as err:
        if settings.skipped:
            raise CheckpointMismatchError(f"{err} (the yaml's checkpoints {', '.join(settings.skipped)} do not "
                                          "exist and were skipped for --checkpoint)") from None
        raise
    except (ValueError, RuntimeError, OSError) as err:
        paths = ", ".join(settings.checkpoints.values())
        raise UserError(f"cannot load the checkpoint(s) {paths}: {_first_line(err)}") from None
    model.set_train(False)
    return model


def generation_config(args, settings):
    from visualglm.generation import GenerationConfig
    return GenerationConfig(max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                            min_new_tokens=getattr(args, "min_new_tokens", 0),
                            do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            seed=None if settings is None else settings.seed).check()


@dataclass
class Components:
    settings: RunSettings
    model: object
    tokenizer: object
    image_processor: object
    processor: object
    generation: object       # GenerationConfig from the arguments


def check_lengths(samples, processor, config, generation, english=False):
    """Fail before the model is built when a prompt (plus max_new_tokens, or max_length) does not fit
    text_config.seq_length, the KV-cache length: prompt + answer budget. Never capped silently."""
    from visualglm.generation import SequenceTooLongError
    seq_length = config.text_config.seq_length
    if generation.max_length is not None and generation.max_length > seq_length:
        raise SequenceTooLongError(f"max_length {generation.max_length} exceeds the model's seq_length {seq_length}: "
                                   "raise --seq_length")
    for sample in samples:
        ids, _ = processor.build_input_ids(sample.prompt, english=english, with_image=sample.image is not None)
        limit = generation.max_length or seq_length
        if len(ids) >= limit:
            raise SequenceTooLongError(f"prompt {sample.id} has {len(ids)} tokens and leaves no room to generate "
                                       f"within {limit} tokens (seq_length {seq_length}): raise --seq_length")
        if len(ids) + generation.min_new_tokens > limit:
            raise SequenceTooLongError(f"prompt {sample.id} of {len(ids)} tokens + min_new_tokens "
                                       f"{generation.min_new_tokens} exceeds {limit} tokens (seq_length {seq_length}): "
                                       "raise --seq_length or lower --min_new_tokens")
        if generation.max_new_tokens is not None and len(ids) + generation.max_new_tokens > limit:
            what = f"max_length {limit}" if generation.max_length else f"the model's seq_length {seq_length}"
            raise SequenceTooLongError(f"prompt {sample.id} of {len(ids)} tokens + max_new_tokens "
                                       f"{generation.max_new_tokens} exceeds {what}: raise --seq_length or lower "
                                       "--max_new_tokens")


def prepare(args, check_settings=None):
    """What the generate scripts do first: print the parsed arguments (as upstream's scripts do, but on stderr:
    stdout carries the answers only), check them,
    collect the samples (every image checked before the model is built), build the components (see
    build_components for check_settings). Returns (samples, components)."""
    print(args, file=sys.stderr, flush=True)
    check_arguments(args)
    samples = collect_samples(args)
    return samples, build_components(args, samples, check_settings)


def build_components(args, samples=(), check_settings=None):
    """Check the arguments (and that the samples' prompts fit), set the device, build tokenizer,
    processors and the model. check_settings(RunSettings): a script's own checks of the yaml, before the model
    is built."""
    from visualglm.processing import VisualGLMProcessor
    settings = load_settings(args)
    if check_settings:
        check_settings(settings)
    generation = generation_config(args, settings)
    tokenizer = build_tokenizer(settings)
    image_processor = build_image_processor(settings)
    processor = VisualGLMProcessor.from_config(settings.config, tokenizer, image_processor)
    check_lengths(samples, processor, settings.config, generation, getattr(args, "english", False))
    set_device(settings.device_target, settings.device_id, settings.max_device_memory)
    model = build_network(settings)
    return Components(settings, model, tokenizer, image_processor, processor, generation)


def build_engine(components, args):
    from visualglm.chat import VisualGLMChat
    return VisualGLMChat(components.model, components.processor, components.generation, use_past=args.use_past)


# ----------------------------------------------------------------------------------------------- output
def format_response(answers):
    """The scripts' result line: `Response: ['answer 1', 'answer 2']` (the Python repr of the list)."""
    return f"Response: {list(answers)!r}"


def stream_answer(engine, sample, english, write):
    """Generate one answer, writing text as it becomes stable; returns the final answer.
    The last character is held back until the next token (process_response may still change it)."""
    printed, answer = "", ""
    for answer, _ in engine.stream_chat(sample.prompt, image=sample.image, english=english):
        stable = answer[:-1].rstrip("\ufffd")
        if stable.startswith(printed) and len(stable) > len(printed):
            write(stable[len(printed):])
            printed = stable
    if answer.startswith(printed):
        write(answer[len(printed):])
    else:   # the cleaned answer changed text already shown: show it whole
        write("\n" + answer)
    write("\n")
    return answer


def run_generation(engine, samples, args, write=None):
    """Answer the samples `args.generate_repeat_time` times: with args.stream each answer is written as it is
    generated (one sample at a time), otherwise the engine batches them; after every round the Response line
    is printed. Returns the last round's answers."""
    import sys
    if write is None:
        def write(text):
            sys.stdout.write(text)
            sys.stdout.flush()
    answers = []
    for _ in range(args.generate_repeat_time):
        if getattr(args, "stream", False):
            answers = [stream_answer(engine, sample, args.english, write) for sample in samples]
        else:
            answers = engine.generate([s.image for s in samples], [s.prompt for s in samples], english=args.english)
        print(format_response(answers), flush=True)
    return answers
