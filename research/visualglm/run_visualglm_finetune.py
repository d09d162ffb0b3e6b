"""LoRA-finetune VisualGLM-6B.

    python run_visualglm_finetune.py --config run_visualglm_demo_finetune.yaml --output_dir output/star_lora

Progress goes to stderr; stdout gets the result: the LoRA weights' path and the loss curve's.
"""
import argparse
import sys

from visualglm.cli import run_main
from visualglm.fileio import sigterm_as_interrupt
from visualglm.finetune import add_finetune_args, run_finetune


def main(argv=None):
    parser = add_finetune_args(argparse.ArgumentParser(description=__doc__.split("\n", 1)[0]))
    args = parser.parse_args(argv)
    print(args, file=sys.stderr, flush=True)
    with sigterm_as_interrupt():   # a kill removes the checkpoint being written, like Ctrl-C
        result = run_finetune(args)
    print(f"finished {result['steps']} steps; LoRA weights: {result['trainable_checkpoint']}", flush=True)
    if result["loss_curve"]:   # rank 0 writes it
        print(f"loss curve: {result['loss_curve']['png']} (values: {result['loss_curve']['csv']})", flush=True)


if __name__ == "__main__":
    run_main(main)
