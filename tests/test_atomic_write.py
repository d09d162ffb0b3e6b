"""Every writer writes to a temporary file beside its output and renames it at the end: a full disk, Ctrl-C or
a kill leaves the previous output as it was and no temporary file (issue 16 item 5)."""
import errno
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor

from conftest import FIXTURE, SCRIPTS, load_chat_model, tokenizer_matched_config, write_tiny_yaml
from visualglm.errors import UserError
from visualglm.fileio import atomic_write, write_text_atomic

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
CKPT_DIR = FIXTURE / "checkpoint"   # the tiny upstream SAT checkpoint


def _tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _no_temp(folder):
    leftovers = [p for p in Path(folder).rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


# ----- finetune checkpoints (CheckpointSaver) -----

def _train_step(value):
    """What CheckpointSaver reads of a TrainStep: LoRA and frozen parameters, optimizer moments, the loss scale."""
    def param(name, shape):
        return Parameter(Tensor(np.full(shape, value, np.float32)), name=name)
    lora = [param("layer.mindpet_delta_lora_a", (4, 8)), param("layer.mindpet_delta_lora_b", (8, 4))]
    moments = [param("adam_m.layer.mindpet_delta_lora_a", (4, 8)), param("adam_m.layer.mindpet_delta_lora_b", (8, 4))]
    optimizer = SimpleNamespace(parameters=lora, get_parameters=lambda: lora + moments)
    return SimpleNamespace(optimizer=optimizer, scale_sense=param("scale_sense", (1,)))


@pytest.fixture
def saved_run(tmp_path):
    """An output folder holding one complete save (step 2) and the saver that wrote it, about to save step 4
    with other values."""
    from visualglm.training import CheckpointSaver
    out = tmp_path / "out"
    CheckpointSaver(_train_step(1.0), str(out), 0, save_steps=2, run_settings={"lora_rank": 4}).save(1, 2)
    saver = CheckpointSaver(_train_step(2.0), str(out), 0, save_steps=2, run_settings={"lora_rank": 4})
    return out, saver, _tree(out)


def _fail_in_checkpoint(monkeypatch, error, file_number=1):
    """mindspore.save_checkpoint raises `error` in its `file_number`-th file, after writing one tensor into it
    (a disk filling up mid-file); returns the files it was writing."""
    from mindspore.train import serialization
    files = []

    def wrap(real):
        def write(name, value, f, *args, **kwargs):
            result = real(name, value, f, *args, **kwargs)
            if f.name not in files:
                files.append(f.name)
                if len(files) == file_number:
                    f.flush()   # the bytes are on disk when the error hits
                    raise error
            return result
        return write
    for name in ("_write_parameter_data", "_write_parameter_bytes_data"):
        monkeypatch.setattr(serialization, name, wrap(getattr(serialization, name)))
    return files


def test_disk_full_in_a_checkpoint_keeps_the_previous_one_and_names_the_file(saved_run, monkeypatch):
    out, saver, before = saved_run
    files = _fail_in_checkpoint(monkeypatch, NO_SPACE)
    state = out / "checkpoint" / "rank_0" / "visualglm_rank_0-1_4.ckpt"
    with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(state))}: No space left on device; "
                                        r"free space or choose another --output_dir$"):
        saver.save(1, 4)
    assert len(files) == 1 and ".tmp" in files[0]   # MindSpore's own temporary file held data
    assert _tree(out) == before                     # byte for byte, and nothing else
    _no_temp(out)


def test_disk_full_in_the_second_checkpoint_leaves_complete_files_only(saved_run, monkeypatch):
    out, saver, before = saved_run
    _fail_in_checkpoint(monkeypatch, NO_SPACE, file_number=2)
    with pytest.raises(UserError, match=r"^cannot write .*visualglm_rank_0-trainable_params\.ckpt: No space"):
        saver.save(1, 4)
    _no_temp(out)
    after = _tree(out)
    assert {k: v for k, v in after.items() if k in before} == before   # the step-2 files untouched
    new_state = ms.load_checkpoint(str(out / "checkpoint" / "rank_0" / "visualglm_rank_0-1_4.ckpt"))
    assert float(new_state["scale_sense"].asnumpy()[0]) == 2.0           # a complete new state


def test_ctrl_c_in_a_checkpoint_keeps_the_previous_one(saved_run, monkeypatch):
    out, saver, before = saved_run
    files = _fail_in_checkpoint(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        saver.save(1, 4)
    assert len(files) == 1
    assert _tree(out) == before
    _no_temp(out)


# ----- atomic_write itself -----

def test_success_replaces_the_target_with_mode_644(tmp_path):
    target = tmp_path / "new" / "folder" / "weights.ckpt"   # missing folders are created
    params = [{"name": "w", "data": Tensor(np.arange(6, dtype=np.float32))}]
    with atomic_write(str(target)) as tmp:
        assert Path(tmp).parent == target.parent and tmp.endswith(".ckpt")   # the suffix picks the format
        ms.save_checkpoint(params, tmp)
    np.testing.assert_array_equal(ms.load_checkpoint(str(target))["w"].asnumpy(), np.arange(6))
    assert stat.S_IMODE(target.stat().st_mode) == 0o644    # MindSpore's own files are read-only
    assert os.listdir(target.parent) == ["weights.ckpt"]

    text = tmp_path / "report.md"
    text.write_text("old")
    write_text_atomic(str(text), "新的\n")
    assert text.read_text(encoding="utf-8") == "新的\n" and stat.S_IMODE(text.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["new", "report.md"]


@pytest.mark.parametrize("error", [NO_SPACE, KeyboardInterrupt(), SystemExit(3)])
def test_any_failure_removes_the_temporary_files(tmp_path, error):
    target = tmp_path / "out.ckpt"
    target.write_bytes(b"previous")
    with pytest.raises(type(error)):
        with atomic_write(str(target)) as tmp:
            Path(tmp).write_bytes(b"half")
            Path(os.path.splitext(tmp)[0] + ".tmp").write_bytes(b"half")   # where mindspore.save_checkpoint writes
            raise error
    assert os.listdir(tmp_path) == ["out.ckpt"] and target.read_bytes() == b"previous"


# ----- kill (SIGTERM) -----

HALF_WRITE = """
import sys, time
from visualglm.fileio import atomic_write, sigterm_as_interrupt
with sigterm_as_interrupt(), atomic_write(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"half")
        f.flush()
        print(tmp, flush=True)
        time.sleep(120)
"""


def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    process = subprocess.Popen([sys.executable, "-c", HALF_WRITE, str(target)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tmp = process.stdout.readline().strip()
        assert os.path.isfile(tmp) and Path(tmp).read_bytes() == b"half"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0 and "KeyboardInterrupt" in err
    assert os.listdir(tmp_path) == ["out.json"] and target.read_text() == "old"


class SigtermNotHandled(Exception):
    pass


@pytest.fixture
def sigterm_guard():
    """While the test runs, a SIGTERM that the code under test does not handle raises SigtermNotHandled
    instead of killing pytest."""
    def unhandled(signum, frame):
        raise SigtermNotHandled
    previous = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, previous)


def _kill_after_first_tensor(monkeypatch):
    """The conversion writer sends this process SIGTERM once the first tensor is in its temporary file."""
    from visualglm import checkpoint_io
    real_write = checkpoint_io._PlannedWriter.write
    written = []

    def write(self, name, array):
        real_write(self, name, array)
        written.append(self.path)
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)   # the handler runs before this ends
    monkeypatch.setattr(checkpoint_io._PlannedWriter, "write", write)
    return written


def _run(main, argv, capsys):
    from visualglm.cli import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def test_sigterm_during_conversion_leaves_no_output(tmp_path, monkeypatch, capsys, sigterm_guard):
    from visualglm import convert_weight
    written = _kill_after_first_tensor(monkeypatch)
    out = tmp_path / "out"
    code, err = _run(convert_weight.main, ["--torch_path", str(CKPT_DIR), "--no_progress",
                                           "--vit_mindspore_path", str(out / "vit.ckpt"),
                                           "--qformer_mindspore_path", str(out / "qformer.ckpt"),
                                           "--glm_mindspore_path", str(out / "glm.ckpt")], capsys)
    assert code == 130 and err.strip() == "interrupted"
    assert len(written) == 1 and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard   # the handler is restored


def test_sigterm_during_merge_leaves_no_output(tmp_path, monkeypatch, capsys, sigterm_guard, chatglm_tokenizer,
                                               chat_checkpoint, chatglm_vocab_file):
    import importlib.util
    from visualglm.lora import apply_lora, lora_parameters
    model = load_chat_model(chatglm_tokenizer, chat_checkpoint)
    apply_lora(model, lora_rank=4, lora_alpha=8, layer_range=[0, 2])
    lora = tmp_path / "lora.ckpt"
    ms.save_checkpoint(lora_parameters(model), str(lora))
    yaml_path = write_tiny_yaml(tmp_path / "lora.yaml", SCRIPTS / "run_visualglm_lora.yaml",
                                tokenizer_matched_config(chatglm_tokenizer), chat_checkpoint, chatglm_vocab_file,
                                pet_config=dict(layer_range=[0, 2], lora_rank=4, lora_alpha=8))
    spec = importlib.util.spec_from_file_location("run_visualglm_with_lora", SCRIPTS / "run_visualglm_with_lora.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = _tree(tmp_path)
    written = _kill_after_first_tensor(monkeypatch)
    code, err = _run(script.main, ["--config", str(yaml_path), "--lora_checkpoint", str(lora), "--device_target",
                                   "CPU", "--image_path", str(FIXTURE / "image.png"), "--prompt", "你好",
                                   "--merge_output", str(tmp_path / "merged.ckpt")], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert len(written) == 1 and ".tmp-" in written[0]
    assert _tree(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


# ----- the conversion / merge writer -----

@pytest.mark.parametrize("error, expected", [(NO_SPACE, UserError), (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failing_merge_write_leaves_no_output_and_no_temp(tmp_path, monkeypatch, error, expected):
    from visualglm import checkpoint_io
    from visualglm.conversion import save_checkpoints
    real_write = checkpoint_io._PlannedWriter.write
    written = []

    def write_then_fail(self, name, array):
        if written:
            raise error
        real_write(self, name, array)
        written.append((self.path, os.path.getsize(self.path)))
    monkeypatch.setattr(checkpoint_io._PlannedWriter, "write", write_then_fail)
    existing = tmp_path / "old.ckpt"
    existing.write_bytes(b"previous")
    arrays = {"a": np.ones((64, 64), np.float32), "b": np.zeros(8, np.float16)}
    with pytest.raises(expected):
        save_checkpoints({str(tmp_path / "merged.ckpt"): arrays, str(existing): arrays,
                          str(tmp_path / "sub" / "merged.safetensors"): arrays})
    assert len(written) == 1 and ".tmp-" in written[0][0] and written[0][1] > 64 * 64 * 4   # a tensor was written
    assert os.listdir(tmp_path) == ["old.ckpt"] and existing.read_bytes() == b"previous"
