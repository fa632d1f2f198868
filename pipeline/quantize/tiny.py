"""The tiny stand-in model quantized to 8-bit GPTQ by the quantize stage's own run: `make tiny-gptq`.

It lives in the pipeline (it runs GPTQModel through the quantize stage); the
fp16 stand-in it starts from is the packager's (`packager.tiny_model`), which
offline validation uses without any pipeline code.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from packager.spec import Quantization
from packager.staging import staged_folder
from packager.tiny_model import save_tiny_model

from .gptq import run_gptq


def save_tiny_gptq(directory: Path, seed: int = 0, model=None) -> Path:
    """The tiny model (or `model`, one of its shape) quantized to 8-bit GPTQ (group 32) by the quantize
    stage's own GPTQModel run.

    Calibration is random token windows: the point is a real GPTQ artifact in the
    layout `make quantize-N` writes, small enough to serve on a CPU.
    """
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, 600, (4, 64), generator=g).tolist()
    with tempfile.TemporaryDirectory(prefix="tiny-fp-") as tmp, staged_folder(directory) as staged:
        save_tiny_model(Path(tmp))
        if model is not None:
            model.save_pretrained(tmp)
        run_gptq(Path(tmp), staged, Quantization(bits=8, group_size=32), windows, torch.device("cpu"), Path(tmp) / "logs")
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m pipeline.quantize.tiny OUTPUT_DIR")
    print(save_tiny_gptq(Path(sys.argv[1])))
