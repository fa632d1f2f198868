"""Command line: `python -m pipeline.convert SRC OUT` (see the package docstring)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .checkpoint import ConvertError, convert_model, is_qwen1, log_stderr
from .lora import convert_adapter, is_qwen1_adapter


def convert_in_place(folder: Path, adapter: bool) -> None:
    """Convert `folder` if it holds Qwen v1 (used at image build time); leave anything else alone."""
    needs = is_qwen1_adapter(folder) if adapter else is_qwen1(folder)
    if not needs:
        log_stderr(f"{folder}: not Qwen (v1); nothing to convert")
        return
    staged = folder.with_name(folder.name + ".qwen2")
    (convert_adapter if adapter else convert_model)(folder, staged, overwrite=True, log=log_stderr)
    shutil.rmtree(folder)
    staged.rename(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.convert", description="Qwen (v1) -> Qwen2, exactly")
    p.add_argument("src", type=Path, help="a Qwen (v1) model folder (or adapter folder with --adapter)")
    p.add_argument("out", type=Path, nargs="?", help="where the Qwen2 folder is written")
    p.add_argument("--adapter", action="store_true", help="SRC is a LoRA adapter (default: when it has adapter_config.json)")
    p.add_argument("--in-place", action="store_true", help="convert SRC where it lies, if it is Qwen (v1)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        if not args.src.is_dir():
            raise ConvertError(f"{args.src}: not a folder; SRC is a downloaded model (or adapter) folder")
        args.adapter = args.adapter or (args.src / "adapter_config.json").is_file()
        if args.in_place:
            convert_in_place(args.src, args.adapter)
        elif args.out is None:
            p.error("OUT is required (or --in-place)")
        elif args.adapter:
            convert_adapter(args.src, args.out, overwrite=args.overwrite, log=log_stderr)
        else:
            convert_model(args.src, args.out, overwrite=args.overwrite, log=log_stderr)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
