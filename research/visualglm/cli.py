"""Argument handling and start-up shared by every script."""
import argparse
import sys

from visualglm.errors import UserError


def run_main(main, argv=None):
    """Run main(argv); a user mistake (UserError, a missing file) is one line on stderr and exit code 2."""
    try:
        return main(argv)
    except (UserError, FileNotFoundError) as err:
        message = str(err) if isinstance(err, UserError) else f"file not found: {err.filename or err}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except MemoryError as err:   # numpy's allocation errors say how much was asked
        print(f"error: out of memory ({str(err) or 'allocation failed'}); lower --batch_size or --seq_length",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class _VerboseAction(argparse.Action):
    """--verbose takes effect while the arguments are parsed, before any library logs."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from visualglm import logs
        logs.set_verbose(True)
        setattr(namespace, self.dest, True)


def add_verbose_arg(parser):
    parser.add_argument("--verbose", action=_VerboseAction,
                        help="also show MindFormers' warnings and info lines (on stderr; default: errors only)")
    return parser


def str2bool(value):
    """argparse type for true/false flags written as words (the MindFormers scripts' convention)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _integer_at_least(minimum, what):
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number
    parse.__name__ = what
    return parse


positive_int = _integer_at_least(1, "an integer >= 1")
non_negative_int = _integer_at_least(0, "an integer >= 0")


def optional_bool(value):
    """str2bool for flags that may also be given bare (`--stream` = `--stream true`)."""
    return str2bool(value)


optional_bool.__name__ = "bool"   # argparse shows "invalid bool value: 'maybe'"


def add_model_args(parser, default_config, default_batch_size=1):
    """Model, checkpoint, tokenizer and device arguments of the inference scripts (spec §16.1)."""
    group = parser.add_argument_group("model")
    group.add_argument("--config", "--config_path", dest="config", default=default_config,
                       help="MindFormers yaml (relative paths are also looked up next to the scripts and in the "
                            "repository root); default: %(default)s")
    group.add_argument("--model_type", default="visualglm_6b", help="unused; kept for the MindFormers scripts")
    group.add_argument("--checkpoint", default=None,
                       help="overrides model_config.checkpoint_name_or_path: the Q-Former checkpoint or a "
                            "whole-model checkpoint (then the yaml's ViT and GLM checkpoints are not needed)")
    group.add_argument("--vocab_file", default=None,
                       help="the tokenizer model ice_text.model (overrides processor.tokenizer.vocab_file)")
    group.add_argument("--device_target", default=None,
                       help="CPU or Ascend (default: the yaml's context.device_target)")
    group.add_argument("--device_id", type=int, default=0, help="device id (default: %(default)s)")
    group.add_argument("--compute_dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="matmul dtype (default: the yaml's model_config.compute_dtype, except float32 on "
                            "CPU, where float16 is slower and bfloat16 unsupported)")
    group.add_argument("--quantization_bit", type=int, choices=(0, 8, 4), default=None,
                       help="weight-only int8 (8) or int4 (4) GLM layer Linears, as THUDM's model.quantize(bits); 0 "
                            "keeps them as stored. An fp16 checkpoint is quantized while it loads; a quantized one "
                            "(convert_weight.py --quantization_bit) loads directly. CPU only (default: the yaml's "
                            "model_config.quantization_bit, else 0)")
    group.add_argument("--seq_length", type=int, default=None,
                       help="GLM KV-cache length = longest prompt + answer budget "
                            "(default: the yaml's text_config.seq_length)")
    group.add_argument("--batch_size", type=int, default=default_batch_size,
                       help="samples generated together (the KV-cache batch); more inputs run in chunks, the "
                            "last one padded (default: %(default)s)")
    group.add_argument("--use_past", type=optional_bool, nargs="?", const=True, default=True,
                       help="decode with the KV cache (true) or recompute every step (false); default: true")
    add_verbose_arg(group)
    return group


def add_generation_args(parser):
    """Sampling and length arguments; None means GenerationConfig's default."""
    group = parser.add_argument_group("generation")
    group.add_argument("--do_sample", type=optional_bool, nargs="?", const=True, default=False,
                       help="sample (true) or greedy search (false, the default)")
    group.add_argument("--top_k", type=int, default=0, help="keep the k best tokens when sampling (0: all)")
    group.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    group.add_argument("--repetition_penalty", type=float, default=1.0,
                       help="SAT-style penalty of already generated tokens (default 1.0: none)")
    group.add_argument("--max_length", type=int, default=None,
                       help="prompt + answer tokens at most (default: seq_length); never silently capped")
    group.add_argument("--max_new_tokens", type=int, default=None,
                       help="answer tokens at most (default: up to seq_length)")
    group.add_argument("--min_new_tokens", type=int, default=0,
                       help="answer tokens at least: the end token is banned before (default 0; benchmarks use "
                            "it to decode an exact number of tokens)")
    group.add_argument("--seed", type=int, default=None, help="sampling seed (default: the yaml's seed)")
    group.add_argument("--english", type=optional_bool, nargs="?", const=True, default=False,
                       help="English prompt template (Q:/A:; the Chinese one when the config has "
                            "english_template: false) and, with the real vocabulary, no CJK tokens")
    return group


def add_input_args(parser, stream=True):
    """Inputs: repeatable --image_path/--prompt pairs or a jsonl file; --stream and --generate_repeat_time."""
    group = parser.add_argument_group("inputs")
    group.add_argument("--image_path", action="append", default=None,
                       help="an image (repeatable, one per --prompt); relative paths are looked up in the "
                            "working directory, then in the repository root. Default: examples/red_circle.png. "
                            "For compatibility one value 'a.jpg,b.jpg' is split on commas when no such file exists")
    group.add_argument("--prompt", action="append", default=None,
                       help="a question (repeatable, one per --image_path; a single one applies to every image). "
                            "Default: 描述这张图片。")
    group.add_argument("--input_file", default=None,
                       help='jsonl file, one {"id": 1, "text": "...", "image": "path"} per line ("image" may be '
                            "missing or null for a text-only question); prompts may contain commas")
    group.add_argument("--generate_repeat_time", type=int, default=1, help="run the whole generation this often")
    if stream:
        group.add_argument("--stream", type=optional_bool, nargs="?", const=True, default=False,
                           help="print each answer as it is generated (inputs one at a time), then the Response line")
    return group


def generate_parser(doc, default_config, stream=True):
    """The generate scripts' parser (run_visualglm*.py): model, generation and input arguments; the
    description is the first line of the script's docstring."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    add_model_args(parser, default_config)
    add_generation_args(parser)
    add_input_args(parser, stream=stream)
    return parser
