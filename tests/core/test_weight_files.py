"""Damaged or foreign weight files: every loader of the package names the file, the format it expected and what the
parser found, instead of safetensors' / torch.load's bare exceptions."""

import pickle

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from swiftstep.core import weight_files
from swiftstep.pipelines import OneStepSRPipeline, single_file
from swiftstep.pipelines.fast_path import load_tiny_decoder
from swiftstep.pipelines.mar_checkpoint import read_checkpoint
from swiftstep.pipelines.pipeline_sr import read_sr_weights, sr_method

TENSORS = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(64, 64)}


def truncated(path, data: bytes):
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def safetensors_files(tmp_path):
    save_file(TENSORS, str(tmp_path / "whole.safetensors"))
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not a checkpoint\n")
    return {"truncated": (truncated(tmp_path / "cut.safetensors", (tmp_path / "whole.safetensors").read_bytes()),
                          "incomplete metadata"),
            "text": (text, "header too large")}


@pytest.fixture
def torch_files(tmp_path):
    def saved(name, **kw):
        torch.save(TENSORS, tmp_path / name, **kw)
        return (tmp_path / name).read_bytes()

    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x02" + bytes(range(7, 250, 3)))
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    legacy = saved("legacy.pkl", _use_new_zipfile_serialization=False)
    return {"truncated zip": (truncated(tmp_path / "cut.pkl", saved("whole.pkl")),
                              "a truncated or damaged zip archive"),
            "truncated pickle": (truncated(tmp_path / "cut_legacy.pkl", legacy), "RuntimeError: unexpected EOF"),
            "garbage": (garbage, "UnpicklingError"),
            "empty": (empty, "EOFError: the file ends early")}


SAFETENSORS_LOADERS = {
    "SR weights": (read_sr_weights, "expected SR weights exported by save_sr_weights"),
    "SR method": (sr_method, "expected SR weights exported by save_sr_weights"),
    "single file": (single_file.checkpoint_family, "expected an SD1.x/SD2.x/SDXL checkpoint in the original"),
    "SR base": (OneStepSRPipeline.from_single_file, "expected an SD1.x/SD2.x/SDXL checkpoint in the original"),
    "tiny VAE": (load_tiny_decoder, r"expected a TAESD decoder"),
}
TORCH_LOADERS = {
    "SR weights": (read_sr_weights, r"expected SR weights \(the official osediff.pkl, pisa_sr.pkl or DLoRAL"),
    "single file": (single_file.checkpoint_family, "expected an SD1.x/SD2.x/SDXL checkpoint in the original"),
    "tiny VAE": (load_tiny_decoder, "expected a TAESD decoder"),
    "MAR": (lambda p: read_checkpoint(p, "model_ema", "MAR"), "expected a MAR checkpoint holding 'model_ema'"),
    "KL-16": (lambda p: read_checkpoint(p, "model", "KL-16 VAE"), "expected a KL-16 VAE checkpoint holding 'model'"),
}


@pytest.mark.parametrize("damage", ["truncated", "text"])
@pytest.mark.parametrize("loader", list(SAFETENSORS_LOADERS))
def test_a_damaged_safetensors_file_is_named_with_the_parser_message(safetensors_files, loader, damage):
    load, expected = SAFETENSORS_LOADERS[loader]
    path, found = safetensors_files[damage]
    with pytest.raises(ValueError, match=rf"{path.name}: {expected}.* in the safetensors format; the safetensors "
                                         rf"parser found: .*{found}") as info:
        load(path)
    assert isinstance(info.value.__cause__, SafetensorError)


@pytest.mark.parametrize("damage", ["truncated zip", "truncated pickle", "garbage", "empty"])
@pytest.mark.parametrize("loader", list(TORCH_LOADERS))
def test_a_damaged_torch_file_is_named_with_the_expected_format(torch_files, loader, damage, tmp_path):
    load, expected = TORCH_LOADERS[loader]
    path, found = torch_files[damage]
    if loader == "single file":  # single-file checkpoints are recognised by their suffix
        path = path.rename(path.with_suffix(".ckpt"))
    with pytest.raises(ValueError, match=rf"{path.name}: {expected}.*torch.load\(weights_only=True\) reads.*; "
                                         rf"found {found}") as info:
        load(path)
    assert info.value.__cause__ is not None


def test_objects_besides_tensors_are_named_without_torchs_advice(tmp_path):
    import argparse

    torch.save({"model_ema": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "train.pth")
    found = r"found UnpicklingError: Unsupported global: GLOBAL argparse.Namespace .*re-save only the state dict\)\.$"
    with pytest.raises(ValueError, match=rf"train.pth: expected a MAR checkpoint .*{found}") as info:
        read_checkpoint(tmp_path / "train.pth", "model_ema", "MAR")
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert "weights_only` set to `False`" not in str(info.value)


def test_whole_files_read_as_before(tmp_path):
    save_file(TENSORS, str(tmp_path / "a.safetensors"))
    torch.save(TENSORS, tmp_path / "a.pth")
    torch.save(TENSORS, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for state in (weight_files.read_safetensors(tmp_path / "a.safetensors", "x"),
                  weight_files.read_torch_file(tmp_path / "a.pth", "x", mmap=True),
                  weight_files.read_torch_file(tmp_path / "legacy.pth", "x", mmap=True)):  # not mappable: read whole
        torch.testing.assert_close(state, TENSORS, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        weight_files.read_torch_file(tmp_path / "missing.pth", "x")
