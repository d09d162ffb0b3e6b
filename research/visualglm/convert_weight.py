"""Convert an upstream VisualGLM-6B checkpoint (SAT or Hugging Face layout) into this port's MindSpore checkpoints.

    python convert_weight.py --torch_path /path/to/visualglm-6b \
        --vit_mindspore_path checkpoints/visualglm_vit.ckpt \
        --qformer_mindspore_path checkpoints/visualglm_qformer.ckpt \
        --glm_mindspore_path checkpoints/glm_6b.ckpt

The layout is detected and printed: a SAT folder (`latest`, `model_config.json`, `1/mp_rank_00_model_states.pt`)
or its .pt file; a Hugging Face folder (`model.safetensors.index.json` or `pytorch_model.bin.index.json` with
their shards, or a single `model.safetensors` / `pytorch_model.bin`) or one of those files. Conversion streams
one tensor at a time; outputs ending in `.safetensors` are MindSpore safetensors files, others `.ckpt`.
"""
import argparse

from visualglm.cli import add_verbose_arg, run_main
from visualglm.conversion import convert_checkpoint
from visualglm.fileio import sigterm_as_interrupt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--torch_path", required=True,
                        help="the upstream checkpoint: a SAT folder (holding 'latest' and model_config.json) or "
                             "its 1/mp_rank_00_model_states.pt; or a Hugging Face folder (sharded or single "
                             ".safetensors / pytorch_model .bin, with config.json), its index file, or a single "
                             "model.safetensors / pytorch_model.bin")
    parser.add_argument("--vit_mindspore_path", default="checkpoints/visualglm_vit.ckpt",
                        help="ViT output (.ckpt, or .safetensors for MindSpore's safetensors format)")
    parser.add_argument("--qformer_mindspore_path", default="checkpoints/visualglm_qformer.ckpt",
                        help="Q-Former output (with ln_vision, query_tokens and llm_proj)")
    parser.add_argument("--glm_mindspore_path", default="checkpoints/glm_6b.ckpt",
                        help="GLM output; glm_6b_for_lite.ckpt (the embedding table; .safetensors if the GLM "
                             "output is) goes next to it")
    for part in ("vit", "qformer", "glm"):
        parser.add_argument(f"--{part}_convert_flag", type=int, choices=(0, 1), default=1,
                            help=f"1 to convert the {part} part, 0 to skip it")
    parser.add_argument("--qkv_layout", choices=("block", "interleaved"), default=None,
                        help="GLM fused qkv rows in the input: 'block' [Q|K|V] (current SAT) or per-head "
                             "'interleaved' (HF ChatGLM-6B / visualglm-6b, SAT before July 2023). Default: the "
                             "layout's (SAT: block, Hugging Face: interleaved)")
    parser.add_argument("--dtype", choices=("keep", "float16", "float32"), default="keep",
                        help="dtype of the written tensors: 'keep' each tensor's stored dtype (default; the "
                             "Hugging Face image encoder is float32, the rest float16), or cast all")
    parser.add_argument("--quantization_bit", type=int, choices=(0, 8, 4), default=0,
                        help="write the GLM layers' query_key_value, dense, dense_h_to_4h and dense_4h_to_h weights "
                             "weight-only int8 (8) or int4 (4) with per-row float16 scales, THUDM's scheme, for a "
                             "model run with the same --quantization_bit (default 0: as stored)")
    parser.add_argument("--config", default=None,
                        help="yaml or model_config.json with the target sizes (default: the checkpoint's "
                             "model_config.json or config.json, else the released VisualGLM-6B)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_verbose_arg(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    outputs = {part: getattr(args, f"{part}_mindspore_path") for part in ("vit", "qformer", "glm")
               if getattr(args, f"{part}_convert_flag")}
    with sigterm_as_interrupt():   # a kill cleans up like Ctrl-C: the temporary files are removed
        convert_checkpoint(args.torch_path, outputs, config=args.config, qkv_layout=args.qkv_layout,
                           dtype=args.dtype, show_progress=not args.no_progress, log=print,
                           quantization_bit=args.quantization_bit)


if __name__ == "__main__":
    run_main(main)
