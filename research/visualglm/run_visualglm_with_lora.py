"""Answer questions with VisualGLM-6B plus finetuned LoRA weights.

    python research/visualglm/run_visualglm_with_lora.py --config run_visualglm_lora.yaml \
        --lora_checkpoint output/checkpoint_trainable/rank_0/visualglm_rank_0-trainable_params.ckpt \
        --image_path finetune/sea.png --prompt "这张图片的背景里有什么内容？"

LoRA layers, rank and alpha come from the yaml's model.model_config.pet_config. With --merge_output the LoRA is
folded into the base weights and saved as one plain checkpoint (load it with run_visualglm.py --checkpoint);
a bare --merge_output writes <lora stem>_merged.ckpt next to the LoRA file, and no input file is ever overwritten.
Prints the arguments (stderr), then `Response: [...]` (stdout) as run_visualglm.py does.
"""
import os
import sys

from visualglm import app
from visualglm.cli import generate_parser, run_main
from visualglm.errors import UserError
from visualglm.fileio import sigterm_as_interrupt

DEFAULT_CONFIG = os.path.join(app.PACKAGE_DIR, "run_visualglm_lora.yaml")
DEFAULT_MERGED = ""   # bare --merge_output: next to the LoRA file (merged_output_path)
DEFAULT_IMAGE, DEFAULT_PROMPT = "finetune/sea.png", "这张图片的背景里有什么内容？"


def parse_args(argv=None):
    parser = generate_parser(__doc__, DEFAULT_CONFIG, stream=True)
    parser.add_argument("--lora_checkpoint", required=True,
                        help="LoRA weights: output/checkpoint_trainable/rank_0/visualglm_rank_0-trainable_params.ckpt")
    parser.add_argument("--merge_output", nargs="?", const=DEFAULT_MERGED, default=None, metavar="FILE",
                        help="also save the base model with the LoRA merged into its weights to FILE (given bare: "
                             "<lora stem>_merged.ckpt in the LoRA file's folder). Never overwrites an input: a "
                             "FILE that is the LoRA file, the config or a checkpoint it or --checkpoint names is "
                             "refused, as is a folder or a read-only file")
    args = parser.parse_args(argv)
    if not args.input_file and not args.image_path:
        args.image_path = [DEFAULT_IMAGE]
        args.prompt = args.prompt or [DEFAULT_PROMPT]
    return args


def merged_output_path(merge_output, lora_path):
    """The file --merge_output writes: the given path, or (given bare) <lora stem>_merged.ckpt next to the LoRA."""
    if merge_output == DEFAULT_MERGED:
        stem = os.path.splitext(os.path.basename(lora_path))[0]
        return os.path.join(os.path.dirname(os.path.abspath(lora_path)), f"{stem}_merged.ckpt")
    return os.path.expanduser(merge_output)


def input_files(args, lora_path):
    """{path: what} of every file this run reads and --merge_output must not overwrite: the LoRA file, the
    config, the checkpoints it names (and --checkpoint) and the tokenizer file."""
    inputs = {lora_path: "the LoRA checkpoint (--lora_checkpoint)"}
    config_path = app.resolve_path(args.config, app.PACKAGE_DIR, app.REPO_ROOT)
    if config_path is None:
        return inputs    # load_settings reports it
    inputs[config_path] = "the config (--config)"
    try:
        from mindformers.tools.register import MindFormerConfig
        model_config = MindFormerConfig(config_path).model.model_config
        named = [(model_config, "model_config.checkpoint_name_or_path"),
                 (model_config.get("vision_config"), "model_config.vision_config.checkpoint_name_or_path"),
                 (model_config.get("text_config"), "model_config.text_config.checkpoint_name_or_path")]
        for node, key in named:
            path = node.get("checkpoint_name_or_path") if node else None
            if path:
                inputs[app.resolve_path(path, app.REPO_ROOT) or path] = f"a checkpoint of the config ({key})"
    except Exception:  # noqa: BLE001 - an unreadable config is reported by load_settings
        pass
    if args.checkpoint:
        inputs[app.resolve_path(args.checkpoint, app.REPO_ROOT) or args.checkpoint] = "the base checkpoint (--checkpoint)"
    if args.vocab_file:
        inputs[app.resolve_path(args.vocab_file, app.REPO_ROOT) or args.vocab_file] = "the tokenizer (--vocab_file)"
    return inputs


def check_merge_output(output, inputs):
    """Refuse an output that is one of the inputs (same real path, or the same file through a link), a folder,
    or not writable, before anything is built or written."""
    from visualglm.fileio import check_output_file
    real = os.path.realpath(output)
    for path, what in inputs.items():
        same = os.path.realpath(path) == real
        if not same and os.path.exists(path) and os.path.exists(output):
            same = os.path.samefile(path, output)
        if same:
            raise UserError(f"--merge_output {output} is {what}; it would be overwritten: choose another file "
                            "(given bare, --merge_output writes <lora stem>_merged.ckpt next to the LoRA file)")
    check_output_file(output, "--merge_output")


def main(argv=None):
    args = parse_args(argv)
    from visualglm.finetune import trained_lora_settings   # after the arguments: --help answers at once
    from visualglm.lora import apply_lora, load_lora, save_merged_checkpoint, use_cpu_kernel
    lora_path = app.lora_checkpoint_path(args.lora_checkpoint)
    merge_output = None
    if args.merge_output is not None:
        merge_output = merged_output_path(args.merge_output, lora_path)
        check_merge_output(merge_output, input_files(args, lora_path))
    def lora_of(settings):
        return trained_lora_settings(settings.yaml, settings.config_path, "--lora_checkpoint")

    samples, components = app.prepare(args, lora_of)   # the LoRA settings are checked before the model is built
    apply_lora(components.model, **lora_of(components.settings))
    use_cpu_kernel(components.model)      # the same products as the server's adapters (api.py --lora)
    load_lora(components.model, lora_path)
    components.model.set_train(False)
    print(f"------------------- lora checkpoint: {lora_path}", file=sys.stderr, flush=True)
    if merge_output:
        with sigterm_as_interrupt():   # a kill removes the half-written file, like Ctrl-C
            count = save_merged_checkpoint(components.model, merge_output)
        print(f"merged {count} LoRA weights into {merge_output}", file=sys.stderr, flush=True)
    return app.run_generation(app.build_engine(components, args), samples, args)


if __name__ == "__main__":
    run_main(main)
