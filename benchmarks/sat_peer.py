"""The upstream PyTorch peer of our GLM for benchmarks: SwissArmyTransformer 0.4.12's `ChatGLMModel`
(`sat.model.official.chatglm_model`), run single-process on the CPU, with our GLM weights copied in.

Install (no deepspeed, no CUDA torch; the CPU torch already installed is used):

    pip install --no-deps SwissArmyTransformer==0.4.12
    pip install einops

SAT's other declared dependencies (sentencepiece, tensorboardX, datasets, transformers) are already
present here; deepspeed, cpm-kernels, boto3 and webdataset are not needed to build and run `ChatGLMModel`
(sat/__init__ only warns that deepspeed is missing). One import does fail: `sat.model.position_embedding`
imports its triton rotary kernel module, which imports `triton`. ChatGLM never uses that kernel (its
rotary embedding is `RotaryEmbedding` in plain torch), so `import_sat()` puts a stand-in for
`sat.model.position_embedding.triton_rotary_embeddings` into `sys.modules` (only in this process) before
importing SAT. Nothing named `triton` is faked, so other libraries' triton detection is unaffected.
If `transformers` refuses to import (it checks the installed huggingface-hub version), SAT's package import
would fail on `sat/model/official/gpt2_model.py`'s `from transformers.activations import ACT2FN`; then a
stand-in for that one module is used (ChatGLM never uses transformers) and a line on stderr says so.

Everything here follows SAT's own generation path: `filling_sequence` with `CachedAutoregressiveMixin`
(prefill once, then one token per forward with `mems` grown by `update_mems`), and, without the mixin, a
full forward over the whole sequence per token. Masks and positions come from `ChatGLMModel.get_inputs`.

bench_generate.py runs this file as its own process (`python sat_peer.py WORKDIR`, never importing
MindSpore there): in a process that had imported and run MindSpore, torch's CPU ops were measured 1.7x
(a 4096x16384 matmul) to 45x (small element-wise ops) slower on this machine (MindSpore sets
OMP_NUM_THREADS=1 at import; the cause was not pinned down further). WORKDIR holds job.json, image.npy and weights/*.npy (our GLM parameter
names); the process writes result.json (timings) and sat_logits.npy (logits for the parity check).
"""
import argparse
import json
import os
import sys
import time
import types
import warnings

import numpy as np

_TRITON_MODULE = "sat.model.position_embedding.triton_rotary_embeddings"


def import_sat():
    """Import torch and SAT's ChatGLM pieces; returns a namespace with what the peer needs."""
    if _TRITON_MODULE not in sys.modules:
        stand_in = types.ModuleType(_TRITON_MODULE)

        class FastRotaryEmbedding:  # pylint: disable=too-few-public-methods
            def __init__(self, *args, **kwargs):
                raise RuntimeError("triton rotary embeddings are not available in this benchmark")

        stand_in.FastRotaryEmbedding = FastRotaryEmbedding
        sys.modules[_TRITON_MODULE] = stand_in
    import torch
    try:
        import transformers.activations  # noqa: F401  (SAT's GPT-2 module reads ACT2FN at import)
    except ImportError as err:
        # A transformers that refuses to import (e.g. it rejects the installed huggingface-hub) would stop
        # SAT's package import, although ChatGLM never touches transformers: stand in for the one name read.
        print(f"[sat_peer] transformers does not import ({str(err).splitlines()[0]}); using a stand-in "
              "for transformers.activations.ACT2FN, which only SAT's GPT-2 model reads", file=sys.stderr)
        for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
            del sys.modules[name]
        package = types.ModuleType("transformers")
        activations = types.ModuleType("transformers.activations")
        activations.ACT2FN = {"gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}
        package.activations = activations
        sys.modules["transformers"] = package
        sys.modules["transformers.activations"] = activations
    import sat
    from sat.model.base_model import BaseMixin
    from sat.model.official.chatglm_model import ChatGLMModel
    from sat.model.cached_autoregressive_model import CachedAutoregressiveMixin
    from sat.generation.autoregressive_sampling import update_mems
    return types.SimpleNamespace(torch=torch, version=sat.__version__, BaseMixin=BaseMixin,
                                 ChatGLMModel=ChatGLMModel, CachedAutoregressiveMixin=CachedAutoregressiveMixin,
                                 update_mems=update_mems)


def _image_mixin_class(sat):
    class ImageSpliceMixin(sat.BaseMixin):
        """Word embeddings with image embeddings in place of the image slots, as VisualGLM's image mixin
        does on the forward that sees the whole prompt (decode steps see one token and pass through)."""

        def word_embedding_forward(self, input_ids, output_cross_layer, **kw_args):
            embeds = self.transformer.word_embeddings(input_ids)
            image = kw_args.get("image_embeds")
            start = kw_args.get("image_start")
            if image is not None and input_ids.shape[1] >= start + image.shape[1]:
                end = start + image.shape[1]
                embeds = sat.torch.cat((embeds[:, :start], image.to(embeds.dtype), embeds[:, end:]), dim=1)
            return embeds

    return ImageSpliceMixin


class SATPeer:
    """SAT ChatGLMModel at the sizes of our GLMConfig `tc`, weights copied from `glm_params`
    ({our parameter name without 'llm_model.': numpy array})."""

    def __init__(self, tc, glm_params, threads=2):
        self.sat = sat = import_sat()
        torch = sat.torch
        torch.set_num_threads(threads)
        args = argparse.Namespace(
            num_layers=tc.num_layers, hidden_size=tc.hidden_size, num_attention_heads=tc.num_heads,
            vocab_size=tc.vocab_size, max_sequence_length=max(2048, tc.seq_length),
            inner_hidden_size=tc.inner_hidden_size, hidden_size_per_attention_head=tc.hidden_size_per_attention_head,
            layernorm_order="post", layernorm_epsilon=tc.layernorm_epsilon, skip_init=True,
            use_gpu_initialization=False, model_parallel_size=1, bos_token_id=tc.bos_token_id,
            mask_token_id=tc.mask_token_id, gmask_token_id=tc.gmask_token_id, pad_token_id=tc.pad_token_id)
        self.model = sat.ChatGLMModel(args)
        self.model.add_mixin("image", _image_mixin_class(sat)())
        self.model.add_mixin("auto-regressive", sat.CachedAutoregressiveMixin())
        self.model.eval()
        self._copy_weights(glm_params)

    @staticmethod
    def sat_name(ours):
        """Our GLM parameter name (without 'llm_model.') -> SAT's."""
        if ours == "lm_head.weight":
            return "mixins.chatglm-final.lm_head.weight"
        if ours == "transformer.word_embeddings.embedding_table":
            return "transformer.word_embeddings.weight"
        return ours.replace(".gamma", ".weight").replace(".beta", ".bias")

    def _copy_weights(self, glm_params):
        torch = self.sat.torch
        target = dict(self.model.named_parameters())
        missing = set(target)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only (memory-mapped) arrays: only read here
            for name, value in glm_params.items():
                sat_name = self.sat_name(name)
                if sat_name not in target:
                    raise KeyError(f"{name} -> {sat_name}: no such SAT parameter")
                if tuple(target[sat_name].shape) != tuple(value.shape):
                    raise ValueError(f"{sat_name}: SAT {tuple(target[sat_name].shape)} vs ours {value.shape}")
                target[sat_name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
                missing.discard(sat_name)
        if missing:
            raise KeyError(f"SAT parameters not set from our weights: {sorted(missing)}")

    def set_cache(self, enabled):
        """With the cache, CachedAutoregressiveMixin (SAT's decoding path); without it, plain forwards."""
        has = "auto-regressive" in self.model.mixins
        if enabled and not has:
            self.model.add_mixin("auto-regressive", self.sat.CachedAutoregressiveMixin())
        elif not enabled and has:
            self.model.del_mixin("auto-regressive")

    def inputs(self, ids):
        """SAT's own mask [1, 1, L, L] (float, 1 = may attend) and positions [1, 2, L] for the full ids."""
        torch = self.sat.torch
        ids = torch.tensor([ids], dtype=torch.long)
        mask, positions = self.model.get_inputs(ids)
        return ids, mask, positions

    def forward(self, ids, mask, positions, start, stop, mems=None, image=None, image_start=None):
        """One SAT forward of tokens start … stop-1 attending to columns 0 … stop-1 (cached columns from
        `mems`), as filling_sequence slices them. Returns (last-row logits [1, V], per-layer outputs)."""
        logits, *per_layer = self.model(input_ids=ids[:, start:stop], position_ids=positions[..., start:stop],
                                        attention_mask=mask[..., start:stop, :stop], mems=mems,
                                        image_embeds=image, image_start=image_start)
        return logits[:, -1], per_layer

    def prefill(self, ids, mask, positions, length, image=None, image_start=None):
        """Prompt forward with the cache: (logits [1, V], mems)."""
        logits, per_layer = self.forward(ids, mask, positions, 0, length, None, image, image_start)
        mems = self.sat.update_mems([o["mem_kv"] for o in per_layer], None, max_memory_length=100000)
        return logits, mems

    def decode(self, ids, mask, positions, position, mems):
        """One cached step for the token at `position` (already in ids): (logits [1, V], new mems)."""
        logits, per_layer = self.forward(ids, mask, positions, position, position + 1, mems)
        mems = self.sat.update_mems([o["mem_kv"] for o in per_layer], mems, max_memory_length=100000)
        return logits, mems

    def recompute(self, ids, mask, positions, length, image=None, image_start=None):
        """Full forward over tokens 0 … length-1 (no cache): logits [1, V] of the last one."""
        return self.forward(ids, mask, positions, 0, length, None, image, image_start)[0]


# ----------------------------------------------------------------------------------------------- helpers
def timed(fn, reps):
    """Median wall time of fn() in ms over reps calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def sample_steps(new_tokens, samples):
    """Steps (1 … new_tokens) to time recompute at: all of them, or `samples` evenly spaced."""
    if not samples or samples >= new_tokens:
        return list(range(1, new_tokens + 1))
    return sorted(set(np.linspace(1, new_tokens, samples).round().astype(int).tolist()))


def run_job(workdir):
    """The peer's half of one bench_generate shape (see the module docstring)."""
    with open(os.path.join(workdir, "job.json"), encoding="utf-8") as f:
        job = json.load(f)
    tag = f"[{job['shape']} SAT]"

    def log(*parts):
        print(tag, *parts, file=sys.stderr, flush=True)

    start = time.perf_counter()
    weights = os.path.join(workdir, "weights")
    params = {name[:-len(".npy")]: np.load(os.path.join(weights, name), mmap_mode="r")
              for name in os.listdir(weights)}
    peer = SATPeer(types.SimpleNamespace(**job["text_config"]), params, threads=job["threads"])
    del params
    torch = peer.sat.torch
    log(f"built in {time.perf_counter() - start:.1f} s")
    prompt, fed, filler = job["prompt"], job["fed"], job["filler"]
    new_tokens, reps, length, image_start = job["new_tokens"], job["reps"], len(prompt), job["image_start"]
    image = torch.from_numpy(np.load(os.path.join(workdir, "image.npy")))
    ids, mask, positions = peer.inputs(list(prompt) + fed + filler[len(fed):])  # ids past `fed` get overwritten
    res = {"sat_version": peer.sat.version}
    with torch.no_grad():
        # same computation: prefill and decode logits for the tokens our model chose
        logits, mems = peer.prefill(ids, mask, positions, length, image, image_start)
        out = [logits.numpy().copy()]
        for i, token in enumerate(fed):
            ids[0, length + i] = token
            logits, mems = peer.decode(ids, mask, positions, length + i, mems)
            out.append(logits.numpy().copy())
        np.save(os.path.join(workdir, "sat_logits.npy"), np.stack(out))

        # prefill (with the cache mixin, as generation runs it)
        peer.prefill(ids, mask, positions, length, image, image_start)
        res["sat_prefill_ms"] = timed(lambda: peer.prefill(ids, mask, positions, length, image, image_start), reps)
        log(f"prefill {res['sat_prefill_ms']:.1f} ms")

        # decode with the cache: filling_sequence's loop, own argmax fed back, mems concatenated
        t0 = time.perf_counter()
        logits, mems = peer.prefill(ids, mask, positions, length, image, image_start)
        times = []
        for i in range(new_tokens):
            begin = time.perf_counter()
            ids[0, length + i] = int(logits[0].argmax())
            logits, mems = peer.decode(ids, mask, positions, length + i, mems)
            times.append((time.perf_counter() - begin) * 1e3)
        res["sat_cached_ms"], res["sat_cached_median_ms"] = float(np.mean(times)), float(np.median(times))
        log(f"cached decode {res['sat_cached_ms']:.2f} ms/token, median step {res['sat_cached_median_ms']:.2f} ms "
            f"({time.perf_counter() - t0:.1f} s)")
        del mems

        # decode by recompute: no CachedAutoregressiveMixin, a full forward per new token
        peer.set_cache(False)
        t0 = time.perf_counter()
        steps = sample_steps(new_tokens, job["recompute_samples"])
        if len(steps) == new_tokens:
            logits = peer.recompute(ids, mask, positions, length, image, image_start)
            elapsed = 0.0
            for i in range(new_tokens):
                begin = time.perf_counter()
                ids[0, length + i] = int(logits[0].argmax())
                logits = peer.recompute(ids, mask, positions, length + i + 1, image, image_start)
                elapsed += time.perf_counter() - begin
            res["sat_recompute_ms"] = elapsed * 1e3 / new_tokens
        else:
            ids[0, length:length + len(filler)] = torch.tensor(filler)
            peer.recompute(ids, mask, positions, length + steps[0], image, image_start)
            res["sat_recompute_ms"] = float(np.mean([
                timed(lambda s=s: peer.recompute(ids, mask, positions, length + s, image, image_start), 1)
                for s in steps]))
        log(f"recompute {res['sat_recompute_ms']:.2f} ms/token ({time.perf_counter() - t0:.1f} s)")
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(res, f)


if __name__ == "__main__":
    usage = "usage: python sat_peer.py WORKDIR   (started by bench_generate.py, which writes WORKDIR/job.json)"
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(usage, file=sys.stdout if len(sys.argv) == 2 else sys.stderr)
        raise SystemExit(0 if len(sys.argv) == 2 else 2)
    if not os.path.isdir(sys.argv[1]):
        raise SystemExit(f"error: {sys.argv[1]} is not a folder ({usage})")
    run_job(sys.argv[1])
