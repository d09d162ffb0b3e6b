"""Answer questions about images through the MindFormers pipeline task visualglm_image_to_text_generation
(spec §16.2).

    python research/visualglm/run_visualglm_pipeline.py --device_target CPU --batch_size 2 \
        --input_file examples/example_inputs.jsonl --max_new_tokens 64

Same arguments as run_visualglm.py (without --stream). Prints the parsed arguments and `batch_size is {n}` on
stderr, then `Response: ['answer 1', 'answer 2']` on stdout.
"""
import sys

from visualglm import app
from visualglm.cli import generate_parser, run_main


def parse_args(argv=None):
    return generate_parser(__doc__, app.DEFAULT_CONFIG, stream=False).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mindformers import pipeline   # after the arguments: --help answers at once
    from visualglm.pipeline import TASK
    samples, parts = app.prepare(args)
    generation = {k: v for k, v in vars(parts.generation).items() if k != "banned_token_ranges"}
    pipe = pipeline(task=TASK, model=parts.model, image_processor=parts.image_processor,
                    tokenizer=parts.tokenizer, batch_size=args.batch_size, use_past=args.use_past,
                    english=args.english, **generation)
    print(f"batch_size is {args.batch_size}", file=sys.stderr, flush=True)   # the upstream script's log line
    answers = []
    for _ in range(args.generate_repeat_time):
        answers = pipe([{"image": s.image, "prompt": s.prompt} for s in samples])
        print(app.format_response(answers), flush=True)
    return answers


if __name__ == "__main__":
    run_main(main)
