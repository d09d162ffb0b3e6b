"""Print how far this port is from the upstream PyTorch outputs of the tiny fixture, per stage, in fp32
and with fp16 compute: max|port - golden| / max|golden|.

    python benchmarks/fixture_parity.py [--fixture ../shared/fixtures/visualglm_tiny_sat]
"""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

STAGES = {"vit_out": "vit_out", "qformer_out": "qformer_out", "image_embeds": "image_embeds",
          "input_embeds": "input_embeds", "glm_final_hidden": "glm_final_hidden", "logits": "prefill_logits"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fixture", default=str(Path(__file__).resolve().parents[2] / "shared" / "fixtures"
                                                 / "visualglm_tiny_sat"))
    args = parser.parse_args()
    import mindspore as ms    # after the arguments: --help answers at once
    from mindspore import Tensor
    from visualglm.configuration import VisualGLMConfig
    from visualglm.conversion import convert_checkpoint
    from visualglm.generation import CachedDecoder, greedy_search
    from visualglm.modeling import build_model, load_weights
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    fixture = Path(args.fixture)
    inputs, golden = np.load(fixture / "inputs.npz"), np.load(fixture / "golden.npz")
    out = tempfile.mkdtemp()
    paths = {part: os.path.join(out, f"{part}.ckpt") for part in ("vit", "qformer", "glm")}
    convert_checkpoint(str(fixture / "checkpoint"), paths, show_progress=False)
    print(f"{'stage':26s} {'fp32':>10s} {'fp16':>10s}")
    rows = {}
    for dtype in ("float32", "float16"):
        config = VisualGLMConfig.from_sat_config(str(fixture / "checkpoint"), compute_dtype=dtype,
                                                 text_config=dict(seq_length=64, use_past=True))
        model = build_model(config)
        load_weights(model, **paths)
        stages = model.intermediates(inputs["pixel_values"], inputs["input_ids"], int(inputs["pre_image"]))
        stages["text_only_logits"] = model.logits(inputs["input_ids"])
        embeds = model.encode_image(Tensor(inputs["pixel_values"]))
        decoder = CachedDecoder(model, inputs["input_ids"].tolist(), embeds, [int(inputs["pre_image"])], 60)
        ids, step_logits = greedy_search(decoder, 8, config.text_config.eos_token_id)
        stages["generated_step_logits"] = step_logits[:, 0]
        names = dict(STAGES, text_only_logits="text_only_prefill_logits",
                     generated_step_logits="generated_step_logits")
        for stage, name in names.items():
            err = np.abs(stages[stage] - golden[name]).max() / np.abs(golden[name]).max()
            rows.setdefault(stage, {})[dtype] = err
        rows.setdefault("greedy ids equal", {})[dtype] = float(ids[0] == golden["generated_ids"].tolist())
    for stage, errs in rows.items():
        print(f"{stage:26s} {errs['float32']:10.2e} {errs['float16']:10.2e}")


if __name__ == "__main__":
    main()
