"""The GSM8K protocol pieces of `lora-lite bench`: answer extraction, stats, presets table, summary locking."""

import json
import math
import multiprocessing as mp

import pytest

import lora_lite as ll

pytest.importorskip("transformers")

from conftest import require_asset  # noqa: E402
from lora_lite.bench import presets, stats  # noqa: E402
from lora_lite.bench.protocol import extract_answer, format_prompt, reference_answer  # noqa: E402
from lora_lite.bench.report import SUMMARY_COLUMNS, append_summary  # noqa: E402
from lora_lite.errors import ConfigError  # noqa: E402
from lora_lite.shared_data import gsm8k_file  # noqa: E402


@pytest.mark.parametrize("text,expected", [
    ("#### 42", "42"), ("The answer is 1,234.", "1234"), ("So x = -17", "-17"), ("no number here", None),
    ("#### 5 then the answer is 6", "6"), ("a 3 #### 7 b #### 8", "8"), ("total 2.50.", "2.50"),
    ("#### +12", "+12"), ("3 apples\n#### ", None),
])
def test_extract_answer_pins_the_seed_behaviour(text, expected):
    assert extract_answer(text) == expected


def test_prompt_template_is_the_protocol():
    assert format_prompt("What is 1+1?") == "Question: What is 1+1? Think step by step.\nAnswer:"


def test_extractor_reads_every_gsm8k_test_answer():
    path = gsm8k_file("test")
    require_asset(path)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 1319
    for row in rows:
        final_line = row["answer"].rsplit("\n", 1)[-1]
        assert final_line.startswith("####"), final_line
        literal = final_line.removeprefix("####").strip().replace(",", "")
        assert reference_answer(row["answer"]) == literal
        # a model completion that restates the solution is scored on its own last '####'
        assert extract_answer("Answer: " + row["answer"]) == literal


def test_reference_without_number_is_a_data_error():
    with pytest.raises(ValueError, match="no number"):
        reference_answer("#### none")


def test_mean_ci_uses_student_t():
    mean, hw = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and hw == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-6)
    assert stats.mean_ci([5.0]) == (5.0, 0.0)


def test_mcnemar_exact_values():
    # 10 discordant pairs split 9/1: two-sided exact binomial p = 2 * (1 + 10) / 1024
    a = [1] * 9 + [0] * 1 + [1] * 5
    b = [0] * 9 + [1] * 1 + [1] * 5
    assert stats.mcnemar(a, b) == pytest.approx(22 / 1024)
    assert stats.mcnemar(a, a) == 1.0
    assert stats.mcnemar([1, 0], [0, 1]) == 1.0


def test_paired_bootstrap_separates_a_real_gap_from_noise():
    a = [1.0] * 60 + [0.0] * 40
    b = [1.0] * 40 + [0.0] * 60
    strong = stats.paired_bootstrap(a, b)
    assert strong["diff"] == pytest.approx(0.2) and strong["lo"] > 0 and strong["p"] < 0.01
    same = stats.paired_bootstrap(a, list(a))
    assert same["diff"] == 0 and same["p"] == 1.0
    shuffled = stats.paired_bootstrap(a, a[50:] + a[:50])
    assert shuffled["lo"] < shuffled["diff"] < shuffled["hi"]


def test_seed_mean_scores_requires_the_same_items():
    assert stats.seed_mean_scores([[1, 0], [0, 0]]) == [0.5, 0.0]
    with pytest.raises(ValueError):
        stats.seed_mean_scores([[1, 0], [1]])


def test_variant_table_and_fallback_for_unregistered_rows():
    tiny = presets.PRESETS["tiny"]
    lora = presets.variant_settings("lora", tiny)
    assert lora.cfg.r == tiny.max_r and lora.cfg.alpha == 2 * tiny.max_r and lora.lr == 1e-2 and not lora.notes
    pissa = presets.variant_settings("pissa", presets.PRESETS["qwen"])
    assert pissa.cfg.r == 32 and pissa.cfg.alpha == 32
    ia3 = presets.variant_settings("ia3", presets.PRESETS["qwen"])
    assert ia3.cfg.target_names == (r"(k_proj|v_proj)$",) and ia3.lr == 5e-3
    dora_method = ll.REGISTRY["dora"]
    row = dora_method.bench
    del dora_method.bench
    try:
        dora = presets.variant_settings("dora", tiny)
    finally:
        dora_method.bench = row
    assert dora.lr == ll.REGISTRY["lora"].bench["lr"]["tiny"] and "registers no benchmark defaults" in dora.notes[0]
    with pytest.raises(ConfigError, match="unknown config fields"):
        presets.variant_settings("lora", tiny, knobs={"lambda0": 1.0})
    assert presets.parse_knobs(["lambda0=0.1", "group_size=32"], "delora") == {"lambda0": 0.1}
    assert presets.lr_grid(1e-3, 3, 1.0) == [1e-4, 1e-3, 1e-2]


def _append_many(args):
    out, worker = args
    for i in range(20):
        append_summary(out, _fake_result(f"w{worker}-{i}"), "em")


def _fake_result(run_id):
    scored = {"acc": 50.0, "acc_scores": [1.0, 0.0]}
    return {"run_id": run_id, "variant": "lora", "preset": "tiny", "model": "m", "seed": 0, "lr": 1e-3, "r": 8,
            "preset_settings": {"steps": 3}, "test": scored, "valid": scored, "trainable_params": 10,
            "forgetting": 0.0, "train": {"train_time_s": 1.0}, "wall_time_s": 2.0, "status": "ok",
            "commit": "abc", "time_utc": "now"}


def test_summary_tsv_appends_under_a_lock_from_many_processes(tmp_path):
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(tmp_path, w) for w in range(4)])
    lines = (tmp_path / "summary.tsv").read_text().splitlines()
    assert lines[0].split("\t") == list(SUMMARY_COLUMNS)
    assert len(lines) == 81 and all(len(line.split("\t")) == len(SUMMARY_COLUMNS) for line in lines[1:])
    (tmp_path / "summary.tsv").write_text("old\theader\n")
    append_summary(tmp_path, _fake_result("new"), "em")
    assert len(list(tmp_path.glob("summary.*.tsv.bak"))) == 1
    assert len((tmp_path / "summary.tsv").read_text().splitlines()) == 2
