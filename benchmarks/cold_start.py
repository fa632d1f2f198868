"""Seconds from a submission's server start to a healthy /health, as a container starts: a fresh process, every
cache empty (kernels, Triton, Hugging Face), the model from a local folder.

The server runs as the image runs it (`uvicorn main:app` beside the spec's serve_config.json); `--kernels` names
the folder the image build compiles the GPTQ kernels into (`python -m helm_server.kernels build DIR`), as the
image's HELM_SERVER_KERNELS does. Without it GPTQModel compiles Marlin at the first load, as before the image did.

    python benchmarks/cold_start.py --model DIR --kernels /opt/gptq-kernels
    python benchmarks/cold_start.py --model DIR --spec submission-1 --device cpu   # a CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INFERENCE = REPO / "docker" / "inference"
sys.path[:0] = [str(REPO), str(INFERENCE)]

# Log lines worth printing beside the total: the server's own (model load, kernels, graphs, ready) and failures.
PHASES = (" helm_server", "Traceback", "Error: ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_folder(spec_name: str, device: str, into: Path) -> Path:
    """main.py and the spec's serve_config.json, as the image lays them out."""
    from packager.render import serve_config
    from packager.spec import load_spec

    spec, _ = load_spec(REPO / "submissions" / spec_name / "spec.toml")
    config = serve_config(spec)
    config = config.model_copy(update={"server": config.server.model_copy(update={"device": device})})
    into.mkdir(parents=True)
    shutil.copy2(INFERENCE / "main.py", into / "main.py")
    (into / "serve_config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
    return into


def start_to_healthy(folder: Path, model: Path, kernels: Path | None, timeout: float) -> tuple[float, list[str]]:
    caches = Path(tempfile.mkdtemp(prefix="cold-"))  # every cache the image keeps under /tmp, empty
    env = {k: v for k, v in os.environ.items() if k not in ("HELM_SERVER_KERNELS",)}
    env.update(HOME=str(caches), XDG_CACHE_HOME=str(caches / ".cache"), HF_HOME=str(caches / "hf"),
               TORCH_EXTENSIONS_DIR=str(caches / "torch_extensions"), TRITON_CACHE_DIR=str(caches / "triton"),
               GPTQMODEL_CACHE_DIR=str(caches / "gptqmodel"),
               GPTQMODEL_TORCH_EXTENSIONS_DIR=str(caches / "gptqmodel" / "torch_extensions"),
               MODEL_PATH=str(model), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(INFERENCE), str(REPO), env.get("PYTHONPATH", "")]))
    if kernels is not None:
        env["HELM_SERVER_KERNELS"] = str(kernels)
    port = free_port()
    log = folder / "server.log"
    started = time.perf_counter()
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port",
                                   str(port)], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                elapsed = time.perf_counter() - started
                if server.poll() is not None:
                    raise SystemExit(f"the server exited ({server.returncode}) after {elapsed:.0f} s:\n"
                                     + log.read_text()[-4000:])
                if elapsed > timeout:
                    raise SystemExit(f"no healthy /health within {timeout:.0f} s:\n" + log.read_text()[-4000:])
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.25)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            shutil.rmtree(caches, ignore_errors=True)
    lines = [line for line in log.read_text().splitlines() if any(p in line for p in PHASES)]
    return elapsed, lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a model folder (a benchmark's random GPTQ model)")
    p.add_argument("--spec", default="submission-1", help="the submission whose serve_config.json the server reads")
    p.add_argument("--kernels", type=Path, help="the image's prebuilt kernels (HELM_SERVER_KERNELS); none: JIT")
    p.add_argument("--device", default="cuda")
    p.add_argument("--starts", type=int, default=1, help="starts timed, each with empty caches")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if not (args.model / "config.json").is_file() or not (args.model / "tokenizer.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json and tokenizer.json (build a model with "
                         "benchmarks/helm_mix.py --gptq DIR)")
    if args.kernels is not None and not (args.kernels / "kernels.json").is_file():
        raise SystemExit(f"--kernels {args.kernels}: no kernels.json (python -m helm_server.kernels build DIR)")
    specs = sorted(p.parent.name for p in (REPO / "submissions").glob("*/spec.toml"))
    if args.spec not in specs:
        raise SystemExit(f"--spec {args.spec!r}: no submissions/{args.spec}/spec.toml; use one of {', '.join(specs)}")
    if args.starts < 1:
        raise SystemExit("--starts must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    times = []
    for n in range(args.starts):
        folder = server_folder(args.spec, args.device, work / f"start-{n}")
        seconds, lines = start_to_healthy(folder, args.model, args.kernels, args.timeout)
        times.append(seconds)
        print(f"start {n + 1}: healthy after {seconds:.1f} s ({'prebuilt kernels' if args.kernels else 'no prebuilt kernels'})")
        for line in lines:
            print(f"    {line}")
    print(f"{args.spec}, {args.model}: start to healthy /health {min(times):.1f} s best, {max(times):.1f} s worst "
          f"of {len(times)}")
    if args.json:
        args.json.write_text(json.dumps({"spec": args.spec, "kernels": bool(args.kernels), "seconds": times}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
