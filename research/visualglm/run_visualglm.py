"""Answer questions about images with VisualGLM-6B.

    python research/visualglm/run_visualglm.py --device_target CPU \
        --image_path examples/red_circle.png --prompt "描述这张图片。" \
        --image_path examples/shapes.png --prompt "图中有几个三角形？"
    python research/visualglm/run_visualglm.py --input_file examples/example_inputs.jsonl --batch_size 2

Prints the parsed arguments, then one line `Response: ['answer 1', 'answer 2']` (the Python repr of the list of
answers, in input order); with --stream each answer is printed as it is generated before that line.
"""
from visualglm import app
from visualglm.cli import generate_parser, run_main


def parse_args(argv=None):
    return generate_parser(__doc__, app.DEFAULT_CONFIG, stream=True).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    samples, components = app.prepare(args)
    return app.run_generation(app.build_engine(components, args), samples, args)


if __name__ == "__main__":
    run_main(main)
