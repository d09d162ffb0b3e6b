"""Answer questions about images with VisualGLM-6B (spec §16.1).

    python research/visualglm/run_visualglm.py --device_target CPU \
        --image_path examples/red_circle.png --prompt "描述这张图片。" \
        --image_path examples/shapes.png --prompt "图中有几个三角形？"
    python research/visualglm/run_visualglm.py --input_file examples/example_inputs.jsonl --batch_size 2

Prints the parsed arguments, then one line `Response: ['answer 1', 'answer 2']` (the Python repr of the list of
answers, in input order); with --stream each answer is printed as it is generated before that line.
"""
import argparse

from visualglm import app
from visualglm.cli import add_generation_args, add_input_args, add_model_args, run_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_model_args(parser, app.DEFAULT_CONFIG)
    add_generation_args(parser)
    add_input_args(parser, stream=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(args, flush=True)
    app.check_arguments(args)
    samples = app.collect_samples(args)           # every image checked before the model is built
    components = app.build_components(args, samples)
    return app.run_generation(app.build_engine(components, args), samples, args)


if __name__ == "__main__":
    run_main(main)
