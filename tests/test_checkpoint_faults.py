"""``model.checkpoint`` files that are not what they claim (issue 18): NaN/inf weights, state dicts of non-string
keys or non-tensor values, empty/truncated/text files -- each refused at startup naming the file and the
offending entries -- and DeiT ``main.py`` checkpoints (``args`` an ``argparse.Namespace``), loaded safely.
"""
import argparse
import json
from pathlib import Path

import pytest
import torch

import methods
from experiments import pipeline
from methods.models import CheckpointError, create_backbone, load_state_dict_strict, read_checkpoint
from test_schema import assert_refused_at_startup, make_cfg, no_data  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH2 = "+model.depth=2"
VALID = r"valid: a torch\.save file"


def tiny_state(num_classes=10):
    torch.manual_seed(0)
    return create_backbone("deit_digits_patch4_32", num_classes=num_classes, depth=2).state_dict()


def save(tmp_path, content, name="w.pth"):
    path = tmp_path / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    torch.save(content, path)
    return path


def deit_main_checkpoint(state):
    """Exactly what DeiT's ``main.py`` saves: model, optimizer, lr_scheduler, epoch, args (a Namespace)."""
    vit = create_backbone("deit_digits_patch4_32", num_classes=10, depth=2)
    optimizer = torch.optim.AdamW(vit.parameters(), lr=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    args = argparse.Namespace(model="deit_tiny_patch16_224", batch_size=64, epochs=300, lr=5e-4, smoothing=0.1,
                              data_path="/datasets/imagenet", output_dir="out", dist_eval=False, drop_path=0.1,
                              input_size=224, opt_betas=None, seed=0)
    return {"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "epoch": 299, "args": args}


# ------------------------------------------------------------------------------------ NaN and inf weights
def test_nan_weights_in_a_deit_state_dict_are_refused_at_startup(tmp_path, no_data):
    state = tiny_state()
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    path = save(tmp_path, {"model": state})
    assert_refused_at_startup(tmp_path, [DEPTH2, f"model.checkpoint={path}"], CheckpointError,
                              r"model\.checkpoint=.*w\.pth holds NaN or inf weights in 1 tensor\(s\): "
                              r"blocks\.1\.attn\.qkv\.weight")


def test_inf_weights_in_a_suite_checkpoint_are_refused_at_startup(tmp_path, no_data):
    torch.manual_seed(0)
    dense = methods.create_method("dense", create_backbone("deit_digits_patch4_32", num_classes=10, depth=2))
    state = dense.state_dict()
    state["vit.head.bias"][3] = float("-inf")
    path = save(tmp_path, {"version": 1, "method": "dense", "model": state}, "suite.pth")
    assert_refused_at_startup(tmp_path, [DEPTH2, f"model.checkpoint={path}"], CheckpointError,
                              r"suite\.pth holds NaN or inf weights .*vit\.head\.bias")


def test_many_nonfinite_safetensors_weights_name_the_first_few_and_the_count(tmp_path, no_data):
    from safetensors.torch import save_file

    state = {k: v.clone().fill_(float("nan")) if k.startswith("blocks.") else v for k, v in tiny_state().items()}
    bad = sum(k.startswith("blocks.") for k in state)
    path = tmp_path / "inputs" / "w.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert_refused_at_startup(tmp_path, [DEPTH2, f"model.checkpoint={path}"], CheckpointError,
                              rf"w\.safetensors holds NaN or inf weights in {bad} tensor\(s\): blocks\.0\..*"
                              rf"\.\.\. \({bad} in all\)")


# ------------------------------------------------------------------------------ entries that are not tensors
def test_non_string_keys_are_refused_naming_the_file_and_the_keys(tmp_path, no_data):
    state = tiny_state()
    state[7] = state.pop("head.bias")
    path = save(tmp_path, {"model": state})
    assert_refused_at_startup(tmp_path, [DEPTH2, f"model.checkpoint={path}"], CheckpointError,
                              r"model\.checkpoint=.*w\.pth is not a state dict of named tensors: non-string keys: "
                              r"7 \(int\)")


def test_non_tensor_values_are_refused_naming_the_file_and_the_entries(tmp_path, no_data):
    state = tiny_state()
    state["blocks.0.norm1.weight"] = state["blocks.0.norm1.weight"].tolist()
    state["pos_embed"] = None
    path = save(tmp_path, state)  # a plain state dict, no 'model' wrapper
    assert_refused_at_startup(tmp_path, [DEPTH2, f"model.checkpoint={path}"], CheckpointError,
                              r"w\.pth is not a state dict of named tensors: non-tensor values under: "
                              r"'pos_embed' \(NoneType\), 'blocks\.0\.norm1\.weight' \(list\)")


def test_strict_loading_of_a_malformed_state_dict_is_a_checkpoint_error():
    """Every path into ``load_state_dict_strict`` (resume checkpoints too), not only ``read_checkpoint``."""
    vit = create_backbone("deit_digits_patch4_32", num_classes=10, depth=2)
    for state, entry in (({**vit.state_dict(), 3: torch.zeros(1)}, r"3 \(int\)"),
                         ({**vit.state_dict(), "head.weight": "w"}, r"'head\.weight' \(str\)")):
        with pytest.raises(CheckpointError, match=rf"resume checkpoint x\.pth is not a state dict.*{entry}"):
            load_state_dict_strict(vit, state, "resume checkpoint x.pth")


# ---------------------------------------------------------------------------------- DeiT main.py checkpoints
def test_deit_main_checkpoint_with_namespace_args_runs_through_the_harness(tmp_path, monkeypatch):
    state = tiny_state()
    path = save(tmp_path, deit_main_checkpoint(state), "checkpoint.pth")
    evaluated = {}
    original = pipeline.evaluate

    def spy(session, method, *args, **kwargs):
        evaluated.update({k: v.clone() for k, v in method.vit.state_dict().items()})
        return original(session, method, *args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", spy)
    record = pipeline.run(make_cfg(tmp_path, DEPTH2, f"model.checkpoint={path}", "experiment.train=false"))
    assert record["train"]["init"] == f"checkpoint:{path}" and record["train"]["epochs"] == 0
    assert 0 <= record["metrics"]["top1"] <= 100
    [written] = (tmp_path / "results" / "runs").glob("*.json")
    assert json.loads(written.read_text())["record_id"] == record["record_id"]
    for key, value in state.items():
        torch.testing.assert_close(evaluated[key], value)


def test_deit_main_checkpoint_is_read_with_the_safe_unpickler(tmp_path):
    """``args`` passes, but ``weights_only`` stays on: any other pickled object is still refused."""
    content = read_checkpoint(save(tmp_path, deit_main_checkpoint(tiny_state())))
    assert content["epoch"] == 299 and isinstance(content["args"], argparse.Namespace)
    assert content["args"].model == "deit_tiny_patch16_224" and "head.weight" in content["model"]
    unsafe = deit_main_checkpoint(tiny_state())
    unsafe["args"] = argparse.Namespace(path=Path("/datasets"))  # a PosixPath: not allow-listed
    with pytest.raises(CheckpointError, match=r"cannot read .*u\.pth.*Weights only load failed"):
        read_checkpoint(save(tmp_path, unsafe, "u.pth"))


# ------------------------------------------------------------------------------ files that are no checkpoint
@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "text-safetensors", "empty-safetensors"])
def test_files_that_are_no_checkpoint_are_refused_naming_the_file_and_the_formats(tmp_path, no_data, damage):
    name = "w.safetensors" if damage.endswith("safetensors") else "w.pth"
    path = save(tmp_path, {"model": tiny_state()}, name)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "text": b"model: deit_tiny\nlr: 5e-4\n",
                      "text-safetensors": b"not a safetensors file at all\n", "empty-safetensors": b""}[damage])
    message = {"empty": r"the file is empty \(0 bytes\)", "empty-safetensors": r"the file is empty \(0 bytes\)",
               "text": r"not a torch\.save file \(it starts with b'model: d': neither a zip archive nor a pickle\)"
               }.get(damage, "")
    assert_refused_at_startup(tmp_path, [DEPTH2, f"model.checkpoint={path}"], CheckpointError,
                              rf"model\.checkpoint: cannot read .*{name.replace('.', '[.]')}: .*{message}.*{VALID}")
