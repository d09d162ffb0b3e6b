"""Answer questions with VisualGLM-6B plus finetuned LoRA weights (spec §16.3).

    python research/visualglm/run_visualglm_with_lora.py --config run_visualglm_lora.yaml \
        --lora_checkpoint output/checkpoint_trainable/rank_0/visualglm_rank_0-trainable_params.ckpt \
        --image_path finetune/sea.png --prompt "这张图片的背景里有什么内容？"

LoRA layers, rank and alpha come from the yaml's model.model_config.pet_config. With --merge_output the LoRA is
folded into the base weights and saved as one plain checkpoint (load it with run_visualglm.py --checkpoint).
Prints the arguments, then `Response: [...]` as run_visualglm.py does.
"""
import os

from visualglm import app
from visualglm.cli import generate_parser, run_main
from visualglm.errors import UserError

DEFAULT_CONFIG = os.path.join(app.PACKAGE_DIR, "run_visualglm_lora.yaml")
DEFAULT_IMAGE, DEFAULT_PROMPT = "finetune/sea.png", "这张图片的背景里有什么内容？"


def parse_args(argv=None):
    parser = generate_parser(__doc__, DEFAULT_CONFIG, stream=True)
    parser.add_argument("--lora_checkpoint", required=True,
                        help="LoRA weights: output/checkpoint_trainable/rank_0/visualglm_rank_0-trainable_params.ckpt")
    parser.add_argument("--merge_output", default=None,
                        help="also save the base model with the LoRA merged into its weights to this file")
    args = parser.parse_args(argv)
    if not args.input_file and not args.image_path:
        args.image_path = [DEFAULT_IMAGE]
        args.prompt = args.prompt or [DEFAULT_PROMPT]
    return args


def main(argv=None):
    from visualglm.finetune import lora_settings
    from visualglm.lora import apply_lora, load_lora, save_merged_checkpoint
    args = parse_args(argv)
    lora_path = app.resolve_path(args.lora_checkpoint, app.REPO_ROOT)
    if lora_path is None or not os.path.isfile(lora_path):   # before the model is built
        raise UserError(f"LoRA checkpoint not found: {args.lora_checkpoint}")
    samples, components = app.prepare(args)
    apply_lora(components.model, **lora_settings(components.settings.yaml))
    load_lora(components.model, lora_path)
    components.model.set_train(False)
    print(f"------------------- lora checkpoint: {lora_path}", flush=True)
    if args.merge_output:
        count = save_merged_checkpoint(components.model, args.merge_output)
        print(f"merged {count} LoRA weights into {args.merge_output}", flush=True)
    return app.run_generation(app.build_engine(components, args), samples, args)


if __name__ == "__main__":
    run_main(main)
