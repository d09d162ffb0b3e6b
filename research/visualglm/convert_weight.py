"""Convert an upstream SAT VisualGLM-6B checkpoint into this port's MindSpore checkpoints (spec §14).

    python convert_weight.py --torch_path /path/to/visualglm-6b \
        --vit_mindspore_path checkpoints/visualglm_vit.ckpt \
        --qformer_mindspore_path checkpoints/visualglm_qformer.ckpt \
        --glm_mindspore_path checkpoints/glm_6b.ckpt
"""
import argparse

from visualglm.cli import run_main
from visualglm.conversion import convert_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--torch_path", required=True,
                        help="SAT checkpoint: the folder holding 'latest' and model_config.json, "
                             "or its 1/mp_rank_00_model_states.pt file")
    parser.add_argument("--vit_mindspore_path", default="checkpoints/visualglm_vit.ckpt", help="ViT output")
    parser.add_argument("--qformer_mindspore_path", default="checkpoints/visualglm_qformer.ckpt",
                        help="Q-Former output (with ln_vision, query_tokens and llm_proj)")
    parser.add_argument("--glm_mindspore_path", default="checkpoints/glm_6b.ckpt",
                        help="GLM output; glm_6b_for_lite.ckpt (the embedding table) goes next to it")
    for part in ("vit", "qformer", "glm"):
        parser.add_argument(f"--{part}_convert_flag", type=int, choices=(0, 1), default=1,
                            help=f"1 to convert the {part} part, 0 to skip it")
    parser.add_argument("--qkv_layout", choices=("block", "interleaved"), default="block",
                        help="GLM fused qkv rows in the input: 'block' [Q|K|V] (current SAT) or per-head "
                             "'interleaved' (HF ChatGLM-6B, SAT before July 2023)")
    parser.add_argument("--config", default=None,
                        help="yaml or model_config.json with the target sizes (default: the checkpoint's "
                             "model_config.json, else the released VisualGLM-6B)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    outputs = {part: getattr(args, f"{part}_mindspore_path") for part in ("vit", "qformer", "glm")
               if getattr(args, f"{part}_convert_flag")}
    written = convert_checkpoint(args.torch_path, outputs, config=args.config, qkv_layout=args.qkv_layout,
                                 show_progress=not args.no_progress)
    for path, count in written.items():
        print(f"wrote {path} ({count} tensors)")


if __name__ == "__main__":
    run_main(main)
