"""LoRA-finetune VisualGLM-6B.

    python run_visualglm_finetune.py --config run_visualglm_lora.yaml --graph_mode 0 --batch_size 1
"""
import argparse
import sys

from visualglm.cli import run_main
from visualglm.fileio import sigterm_as_interrupt
from visualglm.finetune import add_finetune_args, run_finetune


def main(argv=None):
    parser = add_finetune_args(argparse.ArgumentParser(description=__doc__.split("\n", 1)[0]))
    args = parser.parse_args(argv)
    print(args, file=sys.stderr, flush=True)   # stdout: the training log and the result
    with sigterm_as_interrupt():   # a kill removes the checkpoint being written, like Ctrl-C
        result = run_finetune(args)
    print(f"finished {result['steps']} steps; LoRA weights: {result['trainable_checkpoint']}", flush=True)


if __name__ == "__main__":
    run_main(main)
