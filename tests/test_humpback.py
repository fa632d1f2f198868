"""`make humpback-N`: Humpback self-augmentation on a CPU, end to end, on tiny stand-ins.

The base is the tiny model taught to answer `Score: 5` after a round marker (tests/tiny_world.py,
quantized by GPTQModel like every tiny artifact); the seed is an oasst1-layout set, the web text a
C4-layout folder of a few dozen documents. Every stage runs for real: the trainer trains the
backward and seed models, `generate` writes instructions and ratings in shards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_rater
from hub_fixtures import RATED_SEED_REPO, save_c4
from pipeline.data import __main__ as data
from pipeline.humpback import __main__ as humpback
from pipeline.humpback import curate
from pipeline.humpback.rate import parse_score, verdict
from pipeline.humpback.shards import file_sha256
from tiny_world import write_world

PASSAGES = 24  # the tiny world's spec: shards of 8, batches of 4


@pytest.fixture(scope="module")
def world(tmp_path_factory, rater_gptq):
    root = write_world(tmp_path_factory.mktemp("humpback"))
    copy_rater(rater_gptq, root / "rater")
    return root


def _args(world, out, *extra) -> list[str]:
    return ["submission-3", "--submissions", str(world / "submissions"), "--model", str(world / "rater"),
            "--data-dir", str(world / "hub"), "--out", str(out), "--device", "cpu", *extra]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def straight(world):
    out = world / "hb"
    assert humpback.main(_args(world, out)) == 0
    return out


# --- the rating's strict parse ----------------------------------------------------------


@pytest.mark.parametrize("text, score", [
    ("The answer is focused and complete.\nScore: 5", 5),
    ("Score: 1", 1),
    ("reasoning\n\nScore: 3\n\n", 3),        # trailing blank lines are not a last line
    ("Score: 5\nbut then more text", None),  # not the last line
    ("Score: 6", None), ("Score: 0", None),  # outside the rubric
    ("score: 4", None), ("Score:4", None), ("Score: 4.", None), ("Score: 4/5", None), ("Final Score: 4", None),
    ("Score: five", None), ("", None), ("I would give it a 5.", None),
])
def test_scores_parse_strictly_from_the_last_line(text, score):
    assert parse_score(text) == score


def test_a_rating_ends_at_its_first_exact_verdict_line():
    assert verdict("Good.\nScore: 4\nQUESTION: next") == "Good.\nScore: 4"
    assert parse_score(verdict("Score: 5.\nScore: 2\nScore: 5")) == 2
    assert verdict("no verdict at all\n") == "no verdict at all"


# --- generation through the serving engine ------------------------------------------------


def test_engine_generation_is_the_same_in_any_batch_and_in_order(rater_gptq):
    """Greedy texts equal one row at a time; a seeded sampled prompt writes the same text beside any neighbours."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.humpback.generate import engine_for, generate, load, row_seed

    device, tokenizer = torch.device("cpu"), AutoTokenizer.from_pretrained(rater_gptq)
    model = load(rater_gptq, None, device, torch.float32)
    texts = ["Passage one about rivers.\nANSWER: ", "A longer passage, with more words about mountains and lakes "
             "and the weather of the north.\nQUESTION: ", "Short\nANSWER: ", "Fourth one\nQUESTION: ", "Fifth\nANSWER: "]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seeds = [row_seed(7, 0, i) for i in range(len(prompts))]
    ended = []

    def run(rows: int, **kw) -> list[str]:
        engine = engine_for(model, tokenizer, device, [151643], rows, 256)
        return generate(engine, prompts, seeds, stops=["\nQUESTION:"], max_new_tokens=10, **kw)

    alone = run(1)
    assert run(3, done=ended.append) == alone and sorted(ended) == list(range(len(prompts)))
    assert any(alone) and all("\nQUESTION:" not in t for t in alone)
    sampled = run(1, temperature=0.7, top_p=0.9)
    assert run(4, temperature=0.7, top_p=0.9) == sampled
    assert len(set(row_seed(7, s, i) for s in range(3) for i in range(300))) == 900


def test_a_prompt_fits_with_its_new_tokens():
    from pipeline.humpback.generate import fits, slot_length

    assert fits([0] * 2000, 48, 2048) and not fits([0] * 2000, 49, 2048)
    assert slot_length(300, 2048) == 512 and slot_length(2040, 2048) == 2048


# --- the run, end to end ---------------------------------------------------------------


def test_every_stage_writes_its_shards_and_counts(straight):
    m = _manifest(straight)["stages"]
    assert m["seed"]["pairs"] == 8 and m["seed"]["rows_read"] == 16
    assert m["passages"]["passages"] == PASSAGES
    assert m["passages"]["dropped"] == {"duplicate": 1, "shorter than 200 characters": 1, "longer than 1000 characters": 1}
    for stage in ("passages", "generated", "scored-1"):
        shards = m[stage]["shards"]
        assert sorted(shards) == ["0", "1", "2"] and sum(s["rows"] for s in shards.values()) == PASSAGES
        assert all(len(s["inputs"]) == 64 and s["seconds"] >= 0 for s in shards.values())
        assert sorted(p.name for p in (straight / stage).iterdir()) == [f"shard-0000{i}.jsonl" for i in range(3)]
    histogram = m["scored-1"]["histogram"]
    assert sum(histogram.values()) == PASSAGES and histogram["5"] == m["scored-1"]["kept"] > 0
    assert histogram["unparseable"] > 0  # the tiny rater is not perfect: those are counted, never kept
    assert set(m["scored-1"]["examples"]) >= {"5", "unparseable"}
    for run in ("backward", "m0"):
        assert json.loads((straight / run / "run.json").read_text())["finished"]
    assert m["plan"]["hours_4090"] >= 0 and m["plan"]["budget_hours"] == 24


def test_the_curated_set_is_a_hub_layout_dataset_of_the_kept_pairs(straight):
    from datasets import load_dataset

    folder = straight / "curated"
    rows = load_dataset("parquet", data_files=str(folder / curate.DATA_FILE), split="train").to_list()
    kept = _manifest(straight)["stages"]["scored-1"]["kept"]
    assert len(rows) == kept == _manifest(straight)["stages"]["curated"]["rows"]
    assert all(r["score"] == 5 and r["instruction"].strip() and r["output"].startswith("Passage ") for r in rows)
    assert "data_files" in (folder / "README.md").read_text()


def test_a_finished_run_reuses_every_shard(world, straight, capsys):
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("shard-*.jsonl")}
    assert humpback.main(_args(world, straight)) == 0
    out = capsys.readouterr().out
    assert "passages: 24 in 3 shards (reused)" in out and "generated: 24 passages in 3 shards (reused)" in out
    assert "up to date" in out and "measured before" in out
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("shard-*.jsonl")} == before


def test_a_run_killed_during_generation_resumes_and_loses_at_most_one_shard(world, straight, tmp_path):
    out = tmp_path / "hb"
    shutil.copytree(straight, out)
    for stage in ("generated", "scored-1", "curated"):
        shutil.rmtree(out / stage)  # the trained models and passages stay: generation starts over
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'docker' / 'inference'}"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.humpback", *_args(world, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "generated" / "shard-00000.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first shard"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / "generated").glob("shard-*.jsonl"))
    assert 1 <= len(done) < 3, "killed mid-generation"
    first = {p.name: p.stat().st_mtime_ns for p in done}
    assert humpback.main(_args(world, out)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in done} == first  # finished shards were kept
    for stage in ("generated", "scored-1"):  # and the result is the uninterrupted run's, byte for byte
        for shard in (straight / stage).iterdir():
            assert file_sha256(out / stage / shard.name) == file_sha256(shard)


def test_prompts_past_the_context_are_left_out_and_counted(world, straight, tmp_path, monkeypatch):
    from pipeline.humpback import generate as hb_generate

    asked = []  # (prompt tokens, new tokens) of every prompt, as the stages check them
    monkeypatch.setattr(humpback, "fits", lambda p, n, c: asked.append((len(p), n)) or hb_generate.fits(p, n, c))
    out = tmp_path / "hb"
    shutil.copytree(straight, out)
    assert humpback.main(_args(world, out)) == 0  # everything reused; the checks still see every prompt
    rating = [p + n for p, n in asked if n == 16]  # the tiny spec's rating max_new_tokens
    backward = [p + n for p, n in asked if n == 12]
    assert len(rating) == len(backward) == PASSAGES
    context = sorted(rating)[PASSAGES // 2]  # about half the rating prompts fit, every backward prompt does
    assert max(backward) <= context
    submissions = tmp_path / "submissions"
    shutil.copytree(world / "submissions", submissions)
    spec = submissions / "submission-3" / "spec.toml"
    spec.write_text(spec.read_text().replace("context_length = 2048", f"context_length = {context}"))
    args = _args(world, out)
    args[args.index("--submissions") + 1] = str(submissions)
    assert humpback.main(args) == 0
    m = _manifest(out)["stages"]
    too_long = sum(r > context for r in rating)
    assert m["generated"]["too_long"] == 0 and m["scored-1"]["too_long"] == too_long > 0
    assert sum(s["too_long"] for s in m["scored-1"]["shards"].values()) == too_long
    assert sum(s["rows"] for s in m["scored-1"]["shards"].values()) == PASSAGES - too_long
    assert sum(m["scored-1"]["histogram"].values()) == PASSAGES - too_long
    assert m["scored-1"]["engine"]["positions"] <= context


def test_the_engine_rows_are_kept_on_resume_and_a_change_regenerates(world, straight, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hb"
    shutil.copytree(straight, out)
    assert _manifest(out)["stages"]["generated"]["engine"]["rows"] == 4  # the tiny spec's cap, all fit on a CPU
    monkeypatch.setattr(humpback, "rows_that_fit", lambda model, device, length, wanted: min(wanted, 2))
    for stage in ("generated", "scored-1"):
        (out / stage / "shard-00001.jsonl").unlink()  # a lost shard: the stage must run, with fewer rows fitting
    assert humpback.main(_args(world, out)) == 0
    printed = capsys.readouterr().out
    assert "generated: 4 rows ran before, 2 fit now: every shard is generated again" in printed
    m = _manifest(out)["stages"]
    assert m["generated"]["engine"]["rows"] == 2
    assert {s["engine_rows"] for s in m["generated"]["shards"].values()} == {2}
    assert sum(s["rows"] for s in m["generated"]["shards"].values()) == PASSAGES


def test_make_data_3_reads_the_curated_pairs_with_the_web_search_tag(world, straight, tmp_path):
    out = tmp_path / "data"
    assert data.main(["submission-3", "--submissions", str(world / "submissions"), "--model", str(world / "rater"),
                      "--data-dir", str(world / "hub"), "--out", str(out), "--humpback", str(straight / "curated")]) == 0
    kept = _manifest(straight)["stages"]["curated"]["rows"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["humpback"]["rows_used"] == kept
    rendered = [json.loads(line) for line in (out / "rendered.jsonl").read_text().splitlines()]
    web = [r for r in rendered if r["source"] == "humpback"]
    assert len(web) == kept and all(r["text"].startswith("Answer with knowledge from web search.\n\n") for r in web)
    curated = {r["instruction"] for r in json.loads(json.dumps(
        [json.loads(line) for f in sorted((straight / "generated").iterdir()) for line in f.read_text().splitlines()]))}
    assert all(any(f"QUESTION: {i}\n" in r["text"] for i in curated) for r in web)


def test_over_budget_is_refused_before_any_training(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(humpback, "cards", lambda: {"target": {"hours": 1e-12}})
    out = tmp_path / "hb"
    assert humpback.main(_args(world, out, "--passages", "4")) == 2
    err = capsys.readouterr().err
    assert "over the challenge's" in err and "BUDGET=ignore" in err
    assert not (out / "backward" / "run.json").exists() and not (out / "generated").exists()


def test_refusals_name_the_fix(world, tmp_path, capsys):
    assert humpback.main(_args(world, tmp_path / "a", "--passages", "500")) == 2
    assert "gave 60 passages of the 500 asked for" in capsys.readouterr().err  # 63 documents, 3 dropped
    assert humpback.main(["submission-2", "--submissions", str(world / "submissions"), "--model", str(world / "rater"),
                          "--out", str(tmp_path / "b")]) == 2
    assert "no [training.humpback] section" in capsys.readouterr().err
    empty = tmp_path / "hub"
    shutil.copytree(world / "hub" / RATED_SEED_REPO.split("/")[0], empty / RATED_SEED_REPO.split("/")[0])
    args = _args(world, tmp_path / "c")
    args[args.index("--data-dir") + 1] = str(empty)  # the seed is there, C4 is not
    assert humpback.main(args) == 2
    assert "allenai/c4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        humpback.main(_args(world, tmp_path / "d", "--passages", "0"))


def test_the_spec_section_is_checked(tmp_path):
    from packager.spec import SpecError, load_spec

    spec = REPO / "submissions" / "submission-3" / "spec.toml"
    folder = tmp_path / "submission-3"
    folder.mkdir()
    (folder / "spec.toml").write_text(spec.read_text())
    with pytest.raises(SpecError, match="prompt_file: no .*humpback_rating.txt"):
        load_spec(folder / "spec.toml")
    (folder / "humpback_rating.txt").write_text("Rate {instruction}.")
    with pytest.raises(SpecError, match=r"exactly \{instruction\} and \{answer\}"):
        load_spec(folder / "spec.toml")
    (folder / "humpback_rating.txt").write_text((spec.parent / "humpback_rating.txt").read_text())
    assert load_spec(folder / "spec.toml")[0].training.humpback.rating.threshold == 5
    text = spec.read_text()
    start = text.index("[[training.data]]            # Humpback")
    (folder / "spec.toml").write_text(text[:start] + text[text.index("[training.humpback]"):])
    with pytest.raises(SpecError, match="no \\[\\[training.data\\]\\] table reads"):
        load_spec(folder / "spec.toml")
    (folder / "spec.toml").write_text(text.replace("min_chars = 400", "min_chars = 5000"))
    with pytest.raises(SpecError, match="min_chars 5000 must be below max_chars 4000"):
        load_spec(folder / "spec.toml")


def test_publish_humpback_refuses_unfinished_sets_and_missing_tokens(world, straight, tmp_path, monkeypatch, capsys):
    from pipeline import publish

    monkeypatch.delenv("HF_TOKEN", raising=False)
    base = ["submission-3", "--submissions", str(world / "submissions"), "--humpback"]
    assert publish.main([*base, "--curated", str(tmp_path / "none")]) == 2
    assert "not a finished curated set" in capsys.readouterr().err
    assert publish.main([*base, "--curated", str(straight / "curated")]) == 2
    assert "HF_TOKEN is not set" in capsys.readouterr().err
    seen = {}
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setattr(publish, "publish", lambda repo, folder, token, msg, kind="model": seen.update(
        repo=repo, folder=folder, kind=kind) or "d" * 40)
    assert publish.main([*base, "--curated", str(straight / "curated")]) == 0
    assert seen == {"repo": "ycchen/humpback-c4-augmented", "folder": straight / "curated", "kind": "dataset"}
    assert "hf_secret" not in capsys.readouterr().out


def test_more_c4_files_are_read_in_order(tmp_path):
    from pipeline.humpback.passages import c4_files, select
    from packager.spec import Unlabelled

    save_c4(tmp_path, documents=10, files=2)
    files = c4_files(Unlabelled(files=2), tmp_path)
    assert [f.name for f in files] == ["c4-train.00000-of-01024.json.gz", "c4-train.00001-of-01024.json.gz"]
    chosen, read, _ = select(files, 15, 200, 1000)
    assert len(chosen) == 15 and read > 10 and chosen[-1]["url"].startswith("https://example.org/")
