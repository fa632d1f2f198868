"""Specs: the three reference submissions, and the errors a user sees for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from packager.build import validate
from packager.cli import main
from packager.spec import SpecError, load_spec, parse_spec

SPECS = REPO / "submissions"


def spec(n: int):
    return load_spec(SPECS / f"submission-{n}" / "spec.toml")[0]


def test_submission_1_is_the_reference_gptq_recipe():
    s = spec(1)
    assert s.base_model.repo_id == "Qwen/Qwen-14B"
    q = s.quantization
    assert (q.method, q.tool, q.bits, q.group_size, q.desc_act) == ("gptq", "gptqmodel", 8, 128, False)
    cal = q.calibration
    assert (cal.dataset, cal.config, cal.split) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")  # as the reference
    assert (cal.num_samples, cal.seq_len, cal.seed) == (120, 4096, 0)
    assert (q.sym, q.damp_percent) == (True, 0.01)
    assert s.adapter is None and s.training is None
    assert s.generation.eos_token_ids == [151643]
    assert s.generation.context_length == 2048 and not s.artifact.trust_remote_code


def test_context_past_the_exact_qwen1_window_is_refused(tmp_path):
    text = (SPECS / "submission-1" / "spec.toml").read_text().replace("context_length = 2048", "context_length = 4096")
    path = _write(tmp_path, text.replace('name = "submission-1"', 'name = "my-sub"'))
    with pytest.raises(SpecError, match="exact only up to 2048 tokens"):
        validate(path)


def test_submission_2_is_the_reference_qlora_recipe():
    t = spec(2).training
    lora = t.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.layers) == (16, 16, 0.05, "all")  # the reference's code (its adapter's name says r64)
    assert lora.target_modules == ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"]
    assert (t.optimizer.name, t.optimizer.lr, t.optimizer.weight_decay) == ("lion", 1e-4, 0.1)
    sch = t.schedule
    assert (sch.scheduler, sch.warmup_ratio, sch.epochs) == ("cosine", 0.06, 5)
    assert (sch.batch_size, sch.gradient_accumulation, sch.max_length) == (1, 32, 2048)
    assert (sch.max_grad_norm, sch.gradient_checkpointing, sch.pad_token) == (1.0, True, "<|extra_21|>")
    oasst, lima = t.data
    assert oasst.source == "oasst1" and oasst.splits == ["train", "validation"] and oasst.language == "en"
    assert (oasst.reply_rank, oasst.parent) == (0, "root")
    assert oasst.drop_if_mentions == ["open assist", "open-assist", "chatgpt", "laion"]
    assert lima.source == "lima" and lima.limit == 1000
    assert (oasst.expect, lima.expect) == (3538, 1000)  # the reference's published set: 3,538 + 1,000 = 4,538


def test_submission_3_adds_arc_and_humpback_at_rank_32():
    t = spec(3).training
    assert t.lora.r == 32
    sources = [d.source for d in t.data]
    assert sources == ["oasst1", "lima", "arc", "humpback"]
    arc = t.data[2]
    assert (arc.subset, arc.splits, arc.questions_per_example) == ("ARC-Challenge", ["train", "validation", "test"], 6)


def _write(tmp_path: Path, text: str, name: str = "my-sub") -> Path:
    path = tmp_path / name / "spec.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _reference_text(n: int = 1) -> str:
    return (SPECS / f"submission-{n}" / "spec.toml").read_text().replace(f'name = "submission-{n}"', 'name = "my-sub"')


def test_unknown_field_names_the_file_and_the_field(tmp_path):
    path = _write(tmp_path, _reference_text().replace("min_new_tokens = 1", "min_new_token = 1"))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message and "generation.min_new_token" in message and "unknown field" in message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("bits = 8", "bits = 5"), "quantization.bits"),
        (("group_size = 128", "group_size = 100"), "power of two"),
        (("eos_token_ids = [151643]", "eos_token_ids = []"), "generation.eos_token_ids"),
        (("min_temperature = 1e-3", "min_temperature = 0"), "generation.min_temperature"),
        (('overflow = "reject"', 'overflow = "wrap"'), "generation.overflow"),
        (('repo_id = "ycchen/yc-test1"\n', ""), "artifact.repo_id"),
    ],
)
def test_invalid_values_are_named(tmp_path, edit, expected):
    path = _write(tmp_path, _reference_text().replace(*edit))
    with pytest.raises(SpecError, match=expected.replace(".", r"\.")):
        load_spec(path)


def test_training_without_adapter_is_refused(tmp_path):
    text = _reference_text(2)
    start = text.index("[adapter]")
    text = text[:start] + text[text.index("[quantization]") :]
    with pytest.raises(SpecError, match=r"\[training\] produces an adapter"):
        load_spec(_write(tmp_path, text))


def test_unknown_data_source_is_refused(tmp_path):
    with pytest.raises(SpecError, match="training.data.1"):
        load_spec(_write(tmp_path, _reference_text(2).replace('source = "lima"', 'source = "alpaca"')))


def test_toml_syntax_error_names_the_file(tmp_path):
    path = _write(tmp_path, "name = \n")
    with pytest.raises(SpecError, match=f"{path}: not valid TOML"):
        load_spec(path)


def test_name_must_match_folder(tmp_path):
    path = _write(tmp_path, _reference_text(), name="other-folder")
    with pytest.raises(SpecError, match="'my-sub' but the folder is 'other-folder'"):
        load_spec(path)


def test_unpinned_revisions_warn_and_strict_refuses(tmp_path):
    path = _write(tmp_path, _reference_text())
    _, _, warnings = validate(path)
    assert any("Qwen/Qwen-14B@main" in w for w in warnings)
    with pytest.raises(SpecError, match="--strict"):
        validate(path, strict=True)


def test_pinned_revisions_pass_strict(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    path = _write(tmp_path, _reference_text().replace('revision = "main"', f'revision = "{sha}"'))
    assert validate(path, strict=True)[2] == []


def test_unknown_base_image_is_refused(tmp_path):
    path = _write(tmp_path, _reference_text().replace('base = "cuda-4090"', 'base = "cuda-9000"'))
    with pytest.raises(SpecError, match="cuda-9000"):
        validate(path)


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    _write(tmp_path, _reference_text().replace("bits = 8", "bits = 9"))
    assert main(["--submissions", str(tmp_path), "check", "my-sub"]) == 2
    assert "quantization.bits" in capsys.readouterr().err
    assert main(["--submissions", str(tmp_path), "check", "nope"]) == 2
    assert "known submissions: my-sub" in capsys.readouterr().err


def test_parse_spec_accepts_minimal_spec():
    text = """
name = "tiny"
[base_model]
repo_id = "org/base"
[artifact]
repo_id = "org/artifact"
[generation]
eos_token_ids = [2]
"""
    s = parse_spec(Path("tiny/spec.toml"), text)
    assert s.server.port == 80 and s.generation.default_top_k == 200 and s.quantization is None


def test_training_templates_are_the_references_byte_for_byte():
    t2 = spec(2).training.template
    assert (t2.system, t2.prompt, t2.answer) == (
        "Answer in the style of an AI Assistant.\n", "USER: {prompt}\nASSISTENT: ", "{answer}<|endoftext|>")
    t3 = spec(3).training.template
    assert t3.for_source("oasst1").system == "Answer in the style of an AI Assistant.\n\n"
    assert t3.for_source("lima").system == t3.for_source("humpback").system == "Answer with knowledge from web search.\n\n"
    arc = t3.for_source("arc")
    assert (arc.system, arc.prompt, arc.choice, arc.answer) == (
        "The following are multiple choice questions (with answers)\n\n", "\nQuestion: {question}\n{choices}Answer: ",
        "{label}. {text}\n", "{answerKey}\n")
    assert (t3.prompt, t3.answer) == ("\nQUESTION: {prompt}\nANSWER: ", "{answer}\n")


def test_a_source_declared_twice_is_refused(tmp_path):
    text = (SPECS / "submission-2" / "spec.toml").read_text().replace('name = "submission-2"', 'name = "my-sub"')
    text += '\n[[training.data]]\nsource = "lima"\nlimit = 10\n'
    with pytest.raises(SpecError, match="declares lima more than once"):
        load_spec(_write(tmp_path, text))


def _broken(tmp_path: Path, n: int, *edits: tuple[str, str]) -> Path:
    text = (SPECS / f"submission-{n}" / "spec.toml").read_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    path = tmp_path / f"submission-{n}" / "spec.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    for extra in (SPECS / f"submission-{n}").glob("*.txt"):  # files the spec names (a rating prompt)
        (path.parent / extra.name).write_bytes(extra.read_bytes())
    return path


def test_every_broken_spec_is_reported_before_exit_2(tmp_path, capsys):
    _broken(tmp_path, 1, ("bits = 8", "bits = 3.5"))
    _broken(tmp_path, 2, ("dropout = 0.05", "dropout = 2"))
    _broken(tmp_path, 3)  # fine
    for command in ("check", "build"):
        assert main(["--submissions", str(tmp_path), command, "--dist", str(tmp_path / "dist")]) == 2
        err = capsys.readouterr().err
        assert "submission-1/spec.toml" in err and "submission-2/spec.toml" in err
        assert "2 of 3 submissions refused: submission-1, submission-2" in err


def test_schema_errors_name_the_line_the_field_and_what_was_given(tmp_path):
    path = _broken(tmp_path, 1, ('bits = 8', 'bits = "8"'), ("group_size = 128", "group_size = 100"))
    lines = path.read_text().splitlines()
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    bits_line = next(i for i, line in enumerate(lines, 1) if line.startswith("bits ="))
    assert f"line {bits_line}: quantization.bits:" in msg and "got the string '8': write it without quotes" in msg
    assert f"line {bits_line + 1}: quantization.group_size: group_size 100 must be -1 or a power of two" in msg
    assert "Value error" not in msg


def test_a_port_other_than_80_is_refused_in_the_spec_with_the_reason(tmp_path):
    path = _broken(tmp_path, 1, ("port = 80", "port = 8080"))
    with pytest.raises(SpecError, match=r"server: port = 8080: the challenge's bot talks to port 80"):
        load_spec(path)


def test_array_table_errors_point_at_their_own_table(tmp_path):
    path = _broken(tmp_path, 3, ("questions_per_example = 6", "questions_per_example = 0"))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("questions_per_example"))
    with pytest.raises(SpecError, match=rf"line {line}: training\.data\.2\.arc\.questions_per_example"):
        load_spec(path)
