"""`make data-N`: the specs' sources, templates byte for byte, loss masks, and refusals of silent data loss.

The sources are small local copies in their Hub layouts (tests/hub_fixtures.py);
the tokenizer is Qwen's, converted from the real vocabulary. Each of the
reference's accidents is reproduced on purpose and must be refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest

from hub_fixtures import ARC_SPLITS, HUMPBACK_REPO, OASST1_KEPT, save_chat_datasets
from pipeline.data import __main__ as data
from pipeline.data import arc, template
from qwen1 import save_qwen1_checkpoint
from tiny_world import write_specs

IGNORE = -100


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    save_chat_datasets(root / "hub")
    save_qwen1_checkpoint(root / "Qwen-14B")
    # The specs expect the real data sets' counts (3,538 oasst1 pairs, 1,000 LIMA rows); the fixtures are small.
    write_specs(root / "submissions", shorten=False)
    return root


def _run(world, name, out, *extra):
    return data.main([name, "--submissions", str(world / "submissions"), "--model", str(world / "Qwen-14B"),
                      "--data-dir", str(world / "hub"), "--out", str(out), *extra])


@contextlib.contextmanager
def edited(world, name, old, new):
    """The world's copy of a spec with `old` replaced by `new`, restored afterwards."""
    path = world / "submissions" / name / "spec.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    try:
        yield
    finally:
        path.write_text(text)


@pytest.fixture(scope="module")
def built3(world):
    out = world / "out-3"
    assert _run(world, "submission-3", out) == 0
    return out


@pytest.fixture(scope="module")
def built2(world):
    out = world / "out-2"
    assert _run(world, "submission-2", out) == 0
    return out


def _rendered(out):
    return [json.loads(line) for line in (out / "rendered.jsonl").read_text().splitlines()]


def _tokenizer(world):
    from pipeline.convert.tokenizer import fast_tokenizer

    return fast_tokenizer(world / "Qwen-14B" / "qwen.tiktoken")


def test_kept_counts_and_every_row_accounted(built3):
    sources = json.loads((built3 / "manifest.json").read_text())["sources"]
    assert list(sources) == ["oasst1", "lima", "arc", "humpback"]
    assert sources["oasst1"]["conversations"] == OASST1_KEPT
    assert sources["oasst1"]["dropped"]["root prompt mentions a blocked word"] == 1
    assert sources["oasst1"]["dropped"]["reply mentions a blocked word"] == 1
    assert sources["oasst1"]["dropped"]["language is not en"] == 2
    assert sources["oasst1"]["dropped"]["rank is not 0"] == 1
    assert (sources["lima"]["conversations"], sources["lima"]["turns"]) == (4, 5)  # the multi-turn row keeps both rounds
    questions = sum(len(rows) for rows in ARC_SPLITS.values())
    assert sources["arc"]["rows_used"] == questions == 13 and sources["arc"]["conversations"] == 3
    assert sources["humpback"]["conversations"] == 2
    for entry in sources.values():
        assert entry["rows_read"] == entry["rows_used"] + sum(entry["dropped"].values())
        assert entry["answer_tokens"] > 0 and len(entry["files"][0]["sha256"]) == 64


def test_submission_2_template_byte_for_byte(built2):
    rows = _rendered(built2)
    assert rows[0]["text"] == ("Answer in the style of an AI Assistant.\nUSER: What is the capital of France?\n"
                               "ASSISTENT: The capital of France is Paris.<|endoftext|>")
    (start, end), = rows[0]["loss_spans"]
    assert rows[0]["text"][start:end] == "The capital of France is Paris.<|endoftext|>"


def test_submission_3_templates_by_source_byte_for_byte(built3):
    rows = _rendered(built3)
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    assert by_source["oasst1"][0]["text"] == (
        "Answer in the style of an AI Assistant.\n\n\nQUESTION: What is the capital of France?\n"
        "ANSWER: The capital of France is Paris.\n")
    assert by_source["lima"][1]["text"] == (
        "Answer with knowledge from web search.\n\n\nQUESTION: Name a prime.\nANSWER: Seven.\n"
        "\nQUESTION: Another one?\nANSWER: Eleven.\n")
    arc_text = by_source["arc"][2]["text"]  # the 13th question alone: none is left out
    assert arc_text == ("The following are multiple choice questions (with answers)\n\n"
                        "\nQuestion: test question 2?\nA. red\nB. green\nC. blue\nD. black\nAnswer: C\n")
    assert by_source["arc"][0]["text"].count("\nQuestion: ") == 6
    assert by_source["humpback"][0]["text"].startswith("Answer with knowledge from web search.\n\n\nQUESTION: Summarise")
    spans = by_source["lima"][1]["loss_spans"]
    assert [by_source["lima"][1]["text"][a:b] for a, b in spans] == ["Seven.\n", "Eleven.\n"]


def test_loss_only_on_answers_tokenized_piece_by_piece(world, built2):
    from datasets import load_dataset

    rows = load_dataset("parquet", data_files=str(built2 / "train.parquet"), split="train")
    tok = _tokenizer(world)
    first = rows[0]
    pieces = ["Answer in the style of an AI Assistant.\n", "USER: What is the capital of France?\nASSISTENT: ",
              "The capital of France is Paris.<|endoftext|>"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in pieces]
    assert first["input_ids"] == ids[0] + ids[1] + ids[2]
    assert first["labels"] == [IGNORE] * (len(ids[0]) + len(ids[1])) + ids[2]
    assert first["labels"][-1] == 151643  # the end-of-text token is learned
    assert first["source"] == "oasst1" and len(rows) == OASST1_KEPT + 4


def test_truncation_is_counted_not_silent(world, tmp_path):
    with edited(world, "submission-2", "max_length = 2048", "max_length = 12"):
        assert _run(world, "submission-2", tmp_path / "short") == 0
    sources = json.loads((tmp_path / "short" / "manifest.json").read_text())["sources"]
    assert sources["oasst1"]["truncated"] == OASST1_KEPT and sources["lima"]["truncated"] >= 1


def test_unchanged_inputs_reuse_the_result(world, built2, capsys):
    before = (built2 / "manifest.json").stat().st_mtime_ns
    assert _run(world, "submission-2", built2) == 0
    assert "up to date" in capsys.readouterr().out
    assert (built2 / "manifest.json").stat().st_mtime_ns == before


# --- the reference's accidents, on purpose -----------------------------------------------


def test_refuses_rounds_stepped_over(world, tmp_path, monkeypatch, capsys):
    """The reference's submission 3 iterated `range(0, len(conv)//2, 2)`: 3 of 6 ARC questions trained."""
    monkeypatch.setattr(template, "rounds", lambda conversation: conversation[: max(1, len(conversation) // 2)])
    assert _run(world, "submission-3", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "arc: 2 examples lost rounds without truncation (example" in err and "3 of 6 answers" in err
    assert not (tmp_path / "x").exists()


def test_refuses_the_last_arc_question_left_out(world, tmp_path, monkeypatch, capsys):
    """The reference grouped with `range(i, min(i + 6, n - 1))`: the last question was never used."""
    monkeypatch.setattr(arc, "group", lambda n, size: [range(s, min(s + size, n - 1)) for s in range(0, n, size)])
    assert _run(world, "submission-3", tmp_path / "x") == 2
    assert "arc: 1 of 13 rows were neither used nor dropped" in capsys.readouterr().err


def test_refuses_a_declared_source_never_consumed(world, tmp_path, monkeypatch, capsys):
    """The reference declared its Humpback data and never loaded it into the training set."""
    real = data.collect
    monkeypatch.setattr(data, "collect", lambda declared, loaded: real([d for d in declared if d.source != "humpback"], loaded))
    assert _run(world, "submission-3", tmp_path / "x") == 2
    assert "humpback: 2 conversations loaded but 0 reached the training set" in capsys.readouterr().err


def test_refuses_an_empty_or_missing_source_and_a_wrong_expect(world, tmp_path, capsys):
    empty = world / "hub" / HUMPBACK_REPO / "data" / "train-00000-of-00001.parquet"
    saved = empty.read_bytes()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), empty)
    try:
        assert _run(world, "submission-3", tmp_path / "x") == 2
        assert "humpback: declared, but it yielded no conversation" in capsys.readouterr().err
        empty.unlink()
        assert _run(world, "submission-3", tmp_path / "x") == 2
        assert f"no data/train-*.parquet under {world / 'hub' / HUMPBACK_REPO}" in capsys.readouterr().err
    finally:
        empty.write_bytes(saved)
    with edited(world, "submission-2", 'source = "lima"\n', 'source = "lima"\nexpect = 1000\n'):
        assert _run(world, "submission-2", tmp_path / "y") == 2
        assert "lima: 4 conversations, the spec expects 1000" in capsys.readouterr().err


def test_template_placeholders_are_checked_with_the_spec(world, capsys):
    with edited(world, "submission-3", 'prompt = "\\nQuestion: {question}', 'prompt = "\\nQuestion: {prompt}'):
        assert _run(world, "submission-3", world / "never") == 2
        assert "template for arc: prompt uses ['prompt']" in capsys.readouterr().err


def test_humpback_from_the_stage_s_local_folder(world, tmp_path):
    """`repo_id` may name the Humpback stage's own output folder instead of a Hub repo."""
    local = tmp_path / "humpback-curated"
    shutil.copytree(world / "hub" / HUMPBACK_REPO, local)
    with edited(world, "submission-3", f'repo_id = "{HUMPBACK_REPO}"', f'repo_id = "{local}"'):
        assert _run(world, "submission-3", tmp_path / "out") == 0
    rows = _rendered(tmp_path / "out")
    assert sum(r["source"] == "humpback" for r in rows) == 2


def test_an_unreachable_hub_is_a_clear_error(world, tmp_path, monkeypatch, capsys):
    """No MODEL and no network: the tokenizer download fails with the switch to use instead, not a traceback."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = data.main(["submission-2", "--submissions", str(world / "submissions"), "--data-dir", str(world / "hub"),
                      "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "could not download Qwen/Qwen-14B@main" in err and "set MODEL=dir" in err
