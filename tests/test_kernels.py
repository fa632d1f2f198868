"""GPTQ kernels compiled by the image build (helm_server/kernels.py): the server never compiles at start.

The compile itself needs nvcc and a CUDA torch (the H200 run in docs/measurements.md); here: what a CPU base
records, and every refusal a folder that cannot serve the card gets, each naming the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helm_server import hf_engine
from helm_server import kernels as prebuilt


def manifest(**changes) -> dict:
    return {**prebuilt.versions(), "archs": ["8.9", "9.0"], "extensions": {"marlin_fp16": "marlin_fp16.so"}, **changes}


def folder_with(tmp_path, data: dict, library: bool = True):
    folder = tmp_path / "kernels"
    folder.mkdir()
    (folder / prebuilt.MANIFEST).write_text(json.dumps(data))
    if library:
        (folder / "marlin_fp16.so").write_bytes(b"\x7fELF")
    return folder


def test_a_cpu_base_records_that_it_has_nothing_to_compile_and_a_build_never_reuses_a_folder(tmp_path, capsys):
    folder = tmp_path / "opt" / "gptq-kernels"
    assert prebuilt.main(["build", str(folder)]) == 0
    data = json.loads((folder / prebuilt.MANIFEST).read_text())
    assert data["cuda"] is None and data["extensions"] == {} and data["torch"] == torch.__version__
    assert "nothing to compile" in capsys.readouterr().out
    assert sorted(p.name for p in folder.parent.iterdir()) == ["gptq-kernels"]  # no .partial or .build left
    with pytest.raises(SystemExit, match="exists: remove it first"):
        prebuilt.main(["build", str(folder)])
    assert prebuilt.main(["check", str(tmp_path / "nothing")]) == 2
    assert "holds no kernels.json" in capsys.readouterr().err


def test_a_folder_that_covers_the_card_gives_its_libraries(tmp_path):
    folder = folder_with(tmp_path, manifest())
    assert prebuilt.check(manifest(), folder, (8, 9)) == [folder / "marlin_fp16.so"]
    assert prebuilt.check(manifest(), folder, (9, 0)) == [folder / "marlin_fp16.so"]


@pytest.mark.parametrize("changes, capability, message", [
    ({}, (8, 0), r"compute capability 8\.0; the image's GPTQ kernels were compiled for 8\.9, 9\.0 .*add 8\.0 to "
                 r"helm_server/kernels\.py ARCHS and rebuild the image"),
    ({"torch": "2.9.1"}, (8, 9), r"compiled for torch 2\.9\.1, this server runs .*rebuild the image"),
    ({"gptqmodel": "7.5.0"}, (8, 9), r"compiled for gptqmodel 7\.5\.0.*rebuild the image"),
    ({"cuda": "12.8", "archs": ["8.9"]}, (8, 9), r"compiled for cuda 12\.8"),
])
def test_a_folder_that_cannot_serve_this_process_is_refused_naming_the_fix(tmp_path, changes, capability, message):
    data = manifest(**changes)
    with pytest.raises(prebuilt.KernelsMissing, match=message):
        prebuilt.check(data, folder_with(tmp_path, data), capability)


def test_a_missing_library_or_manifest_is_refused(tmp_path):
    folder = folder_with(tmp_path, manifest(), library=False)
    with pytest.raises(prebuilt.KernelsMissing, match=r"lacks .*marlin_fp16\.so: rebuild the image"):
        prebuilt.check(manifest(), folder, (8, 9))
    with pytest.raises(prebuilt.KernelsMissing, match=r"holds no kernels\.json: the image build did not compile"):
        prebuilt.read_manifest(tmp_path / "nothing")
    (folder / prebuilt.MANIFEST).write_text("{not json")
    with pytest.raises(prebuilt.KernelsMissing, match="unreadable"):
        prebuilt.read_manifest(folder)


def test_nothing_is_loaded_outside_the_image_or_off_the_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv(prebuilt.KERNELS_ENV, raising=False)
    assert prebuilt.load(torch.device("cuda")) is None  # GPTQModel compiles at first use, as outside any image
    monkeypatch.setenv(prebuilt.KERNELS_ENV, str(tmp_path / "nothing"))
    assert prebuilt.load(torch.device("cpu")) is None  # the CPU serves with GPTQModel's torch kernel


def test_in_the_image_marlin_comes_only_from_the_prebuilt_folder(tmp_path, monkeypatch, caplog):
    """A folder that cannot serve the card: `auto` serves with the torch kernel (logged), a spec naming marlin
    fails to load with the reason; nothing is handed to GPTQModel's compiler."""
    monkeypatch.setenv(prebuilt.KERNELS_ENV, str(tmp_path / "nothing"))
    cuda = torch.device("cuda")
    with caplog.at_level("ERROR", logger="helm_server.engine"):
        assert hf_engine.prebuilt_kernels(["marlin", "torch"], cuda) == ["torch"]
    assert "the image build did not compile the GPTQ kernels" in caplog.text and "nothing compiles at start" in caplog.text
    with pytest.raises(hf_engine.ModelLoadError, match=r"did not compile the GPTQ kernels.*names gptq_kernel"):
        hf_engine.prebuilt_kernels(["marlin"], cuda)
    assert hf_engine.prebuilt_kernels(["torch"], cuda) == ["torch"]


def test_a_bf16_gptq_model_in_the_image_is_refused_before_its_kernel_would_compile(tmp_path, monkeypatch):
    monkeypatch.setenv(prebuilt.KERNELS_ENV, str(folder_with(tmp_path, manifest())))
    with pytest.raises(hf_engine.ModelLoadError, match=r"float16 models only.*dtype = \"float16\""):
        hf_engine.prebuilt_kernels(["marlin"], torch.device("cuda"), torch.bfloat16)


def test_an_unknown_arch_is_refused_before_any_compile(tmp_path):
    with pytest.raises(SystemExit, match="not compute capabilities this server is built for"):
        prebuilt.build(tmp_path / "k", ["7.5"])


def test_the_build_wiring_around_gptqmodel_s_compiler(tmp_path, monkeypatch):
    """CI has no nvcc: GPTQModel's compile is stood in for by one that checks what it is handed and writes a library
    under the name GPTQModel gives it. The build passes the archs and its own folder, answers yes to torch's GPU
    check for the compile alone, takes the one library whatever its name, and leaves nothing else behind."""
    from gptqmodel import extension

    seen = {}

    def compile_(name):
        seen.update(archs=os.environ["TORCH_CUDA_ARCH_LIST"], gpu=torch.cuda.is_available())
        out = Path(os.environ["GPTQMODEL_TORCH_EXTENSIONS_DIR"]) / name / "f038c9e8beb54692"
        out.mkdir(parents=True)
        (out / f"gptqmodel_{name}_ops.so").write_bytes(b"\x7fELF")
        (out / f"{name}.o").write_bytes(b"")
        return {name: True}

    monkeypatch.setattr(extension, "load", compile_)
    monkeypatch.setattr(prebuilt, "versions", lambda: {"torch": "2.11.0+cu130", "cuda": "13.0", "gptqmodel": "7.6.0"})
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    gpu = torch.cuda.is_available()
    folder = tmp_path / "gptq-kernels"
    data = prebuilt.build(folder, ["8.9", "9.0"])
    assert seen == {"archs": "8.9;9.0", "gpu": True}
    assert torch.cuda.is_available() == gpu and "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert data["archs"] == ["8.9", "9.0"] and data["extensions"] == {"marlin_fp16": "marlin_fp16.so"}
    assert sorted(p.name for p in folder.iterdir()) == ["kernels.json", "marlin_fp16.so"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gptq-kernels"]
