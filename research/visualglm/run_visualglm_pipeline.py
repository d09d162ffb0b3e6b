"""Answer questions about images through the MindFormers pipeline task visualglm_image_to_text_generation
(spec §16.2).

    python research/visualglm/run_visualglm_pipeline.py --device_target CPU --batch_size 2 \
        --input_file examples/example_inputs.jsonl --max_new_tokens 64

Same arguments as run_visualglm.py (without --stream). Prints the parsed arguments, logs `batch_size is {n}`,
then prints `Response: ['answer 1', 'answer 2']`.
"""
import argparse

from mindformers import pipeline
from mindformers.tools.logger import logger

from visualglm import app
from visualglm.cli import add_generation_args, add_input_args, add_model_args, run_main
from visualglm.pipeline import TASK


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_model_args(parser, app.DEFAULT_CONFIG)
    add_generation_args(parser)
    add_input_args(parser, stream=False)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(args, flush=True)
    app.check_arguments(args)
    samples = app.collect_samples(args)
    parts = app.build_components(args, samples)
    generation = {k: v for k, v in vars(parts.generation).items() if k != "banned_token_ranges"}
    pipe = pipeline(task=TASK, model=parts.model, image_processor=parts.image_processor,
                    tokenizer=parts.tokenizer, batch_size=args.batch_size, use_past=args.use_past,
                    english=args.english, **generation)
    logger.info("batch_size is %d", args.batch_size)
    answers = []
    for _ in range(args.generate_repeat_time):
        answers = pipe([{"image": s.image, "prompt": s.prompt} for s in samples])
        print(app.format_response(answers), flush=True)
    return answers


if __name__ == "__main__":
    run_main(main)
