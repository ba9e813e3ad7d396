"""The GSM8K protocol pieces of `lora-lite bench`: numeric answer scoring, the presets table, the tiny task's
splits, the length filter, the lr pick, summary locking."""

import json
import math
import multiprocessing as mp
from fractions import Fraction
from types import SimpleNamespace

import pytest

import lora_lite as ll

pytest.importorskip("transformers")

from conftest import require_asset  # noqa: E402
from lora_lite.bench import presets, tiny  # noqa: E402
from lora_lite.bench.data import HFTokenizer, encode_rows  # noqa: E402
from lora_lite.bench.plan import MethodPlan  # noqa: E402
from lora_lite.bench.protocol import extract_answer, format_example, format_prompt, reference_answer  # noqa: E402
from lora_lite.bench.report import SUMMARY_COLUMNS, append_summary, markdown_table, pick_lr, summarize  # noqa: E402
from lora_lite.bench.session import Pace, _extend_past_edges  # noqa: E402
from lora_lite.errors import ConfigError  # noqa: E402
from lora_lite.shared_data import gsm8k_file, stories260k_dir  # noqa: E402


@pytest.mark.parametrize("text,expected", [
    ("#### 42", 42), ("The answer is 1,234.", 1234), ("So x = -17", -17), ("no number here", None),
    ("a 3 #### 7 b", 7), ("total 2.50.", Fraction(5, 2)), ("#### +12", 12), ("3 apples\n#### ", None),
    # the cases string matching scored wrong: trailing zeros, fractions, currency, run-on text after the answer
    ("#### 18.0", 18), ("#### 0.50", Fraction(1, 2)), ("#### 1/2", Fraction(1, 2)), ("#### $1,000", 1000),
    ("#### 18\n\nQuestion: Tom has 3 apples and buys 4 more. #### 7", 18), ("#### 5 then the answer is 6", 5),
])
def test_extract_answer_reads_the_number_after_the_marker(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion,gold", [
    ("#### 18.0", "#### 18"), ("#### 0.50", "#### 0.5"), ("#### 1/2", "#### 0.5"), ("#### 18 dollars. Question: x 3",
                                                                                   "#### 18"),
])
def test_equal_numbers_score_as_correct(completion, gold):
    assert extract_answer(completion) == reference_answer(gold)


def test_prompt_template_is_the_protocol():
    assert format_prompt("What is 1+1?") == "Question: What is 1+1? Think step by step.\nAnswer:"


def test_every_gsm8k_test_reference_scores_right_against_itself():
    from lora_lite.bench.protocol import show_number

    path = gsm8k_file("test")
    require_asset(path)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 1319
    for row in rows:
        final_line = row["answer"].rsplit("\n", 1)[-1]
        assert final_line.startswith("####"), final_line
        literal = final_line.removeprefix("####").strip().replace(",", "")
        gold = reference_answer(row["answer"])
        assert gold == Fraction(literal)
        # a completion that restates the solution, or adds run-on text after it, is scored on its answer
        assert extract_answer("Answer: " + row["answer"]) == gold
        assert extract_answer(row["answer"] + "\n\nQuestion: Ann has 3 coins. Answer: #### 99") == gold
        if "." not in literal:
            assert extract_answer(f"#### {literal}.0") == gold and show_number(gold) == literal.lstrip("+")


def test_reference_without_number_is_a_data_error():
    with pytest.raises(ValueError, match="no number"):
        reference_answer("#### none")


def test_variant_table_and_fallback_for_unregistered_rows():
    tiny_p = presets.PRESETS["tiny"]
    lora = presets.variant_settings("lora", tiny_p)
    assert lora.cfg.r == tiny_p.max_r and lora.cfg.alpha == 2 * tiny_p.max_r and lora.lr == 1e-2 and not lora.notes
    pissa = presets.variant_settings("pissa", presets.PRESETS["qwen"])
    assert pissa.cfg.r == 32 and pissa.cfg.alpha == 32
    ia3 = presets.variant_settings("ia3", presets.PRESETS["qwen"])
    assert ia3.cfg.target_names == (r"(k_proj|v_proj)$",) and ia3.lr == 5e-3
    dora_method = ll.REGISTRY["dora"]
    row = dora_method.bench
    del dora_method.bench
    try:
        dora = presets.variant_settings("dora", tiny_p)
    finally:
        dora_method.bench = row
    assert dora.lr == ll.REGISTRY["lora"].bench["lr"]["tiny"] and "registers no benchmark defaults" in dora.notes[0]
    with pytest.raises(ConfigError, match="unknown config fields"):
        presets.variant_settings("lora", tiny_p, knobs={"lambda0": 1.0})
    assert presets.lr_grid(1e-3, 3, 1.0) == [1e-4, 1e-3, 1e-2]


def test_adapters_keep_fp32_master_tensors_on_a_bf16_preset():
    qwen = presets.variant_settings("lora", presets.PRESETS["qwen"])
    assert presets.PRESETS["qwen"].dtype == "bfloat16" and qwen.cfg.dtype is None  # None: fp32 master tensors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_training_draws_hold_no_valid_or_test_question(seed):
    p = presets.PRESETS["tiny"]
    train = {r["question"] for r in tiny.task_rows("train", 2 * p.steps * p.batch_size, seed)}
    valid = {r["question"] for r in tiny.task_rows("valid", tiny.VALID_POOL)}
    test = {r["question"] for r in tiny.task_rows("test", tiny.TEST_POOL)}
    assert not train & valid and not train & test and not valid & test


def test_long_examples_are_left_out_never_cut():
    from transformers import AutoTokenizer

    require_asset(stories260k_dir() / "tokenizer.json")
    require_asset(gsm8k_file("train"))
    tok = HFTokenizer(AutoTokenizer.from_pretrained(stories260k_dir()))
    rows = [json.loads(line) for line in open(gsm8k_file("train"))][:400]
    examples, too_long = encode_rows(rows, tok, format_example, 512)
    assert too_long > 0 and len(examples) + too_long == len(rows)
    for ids, labels in examples:  # every kept example ends with its eos and holds its "####" line
        assert len(ids) <= 512 and ids[-1] == tok.eos_id and labels[-1] == tok.eos_id
        assert "####" in tok.decode(ids)


def _run(lr, seed, valid, status="ok"):
    scored = {"acc": valid, "acc_scores": [1.0, 0.0]}
    return {"variant": "lora", "lr": lr, "seed": seed, "status": status, "run_id": f"lora-{lr}-{seed}",
            "valid": scored, "test": scored, "forgetting": 0.0, "trainable_params": 1, "wall_time_s": 1.0}


def test_the_pick_compares_lrs_on_their_shared_seeds():
    # A sweep: seed 0 at every lr, seeds 1-2 at the winner (0.01). Those extra seeds came out worse, and a pick
    # by the mean over whatever seeds exist would hand the row to lr 0.001 and its single seed.
    runs = [_run(0.001, 0, 60.0), _run(0.01, 0, 62.0), _run(0.01, 1, 50.0), _run(0.01, 2, 51.0)]
    assert pick_lr(runs, "em") == 0.01
    base = {"test": {"acc": 0.0}, "valid": {"acc": 0.0}}
    row, = summarize(base, runs, "em")
    assert row["lr"] == 0.01 and row["seeds"] == [0, 1, 2]


def test_a_variant_whose_every_run_diverged_gets_a_row_not_an_exception():
    runs = [_run(1e6, 0, 0.0, status="diverged")]
    assert pick_lr(runs, "em") is None
    row, = summarize({"test": {"acc": 0.0}, "valid": {"acc": 0.0}}, runs, "em")
    assert row["status"] == "diverged" and row["lrs_tried"] == [1e6]


def _sweep_with_valid(valid_at, grid=(0.001, 0.01, 0.1), extend=2, diverge_from=None):
    """Runs the sweep's edge extension against a fake `one` whose valid accuracy is `valid_at(lr)`."""
    method = MethodPlan("lora", SimpleNamespace(lr=0.01), grid, (0, 1, 2), True, extend, decades=1.0)
    asked = []

    def one(_method, lr, seed):
        asked.append(lr)
        status = "diverged" if diverge_from is not None and lr >= diverge_from else "ok"
        return _run(lr, seed, valid_at(lr), status)

    sweep = [one(method, lr, 0) for lr in grid]
    best, tried = _extend_past_edges(method, sweep, one, Pace(len(grid)), "em")
    assert tried == sorted({*grid, *asked})
    return best, asked[len(grid):], sweep


def test_steps_past_the_grid_continue_its_spacing_exactly():
    # From the rounded ends (0.316 x 3.16 = 0.999) the steps would drift; they come from the grid's own formula.
    grid = presets.lr_grid(0.01, 5, 1.0)
    assert grid == [0.001, 0.00316, 0.01, 0.0316, 0.1]
    assert [presets.lr_grid_point(0.01, 5, 1.0, i) for i in (5, 6, -1, -2)] == [0.316, 1.0, 0.000316, 0.0001]


def test_a_pick_on_the_grids_edge_steps_past_it_until_the_optimum_is_inside():
    # Optimum at 1.0, one grid step past the top: step to 1.0 (wins), then to 10 (loses): the pick is inside.
    best, extra, _ = _sweep_with_valid(lambda lr: -abs(math.log10(lr)))
    assert best == 1.0 and extra == [1.0, 10.0]
    # Optimum far below: two steps down and no more; the table then says the pick is still the lowest tried.
    best, extra, sweep = _sweep_with_valid(lambda lr: -lr)
    assert best == 1e-5 and extra == [1e-4, 1e-5]
    row, = summarize({"test": {"acc": 0.0}, "valid": {"acc": 0.0}}, sweep, "em")
    assert "1e-05 (best of 5; the lowest tried)" in markdown_table({"test": {"acc": 0.0}, "valid": {"acc": 0.0},
                                                                   "wall_time_s": 0.0}, [row], "em", "t")
    # A step past the top that diverges brackets the optimum; an inside pick and extend=0 add nothing.
    assert _sweep_with_valid(lambda lr: lr, diverge_from=1.0)[:2] == (0.1, [1.0])
    assert _sweep_with_valid(lambda lr: -abs(lr - 0.01))[:2] == (0.01, [])
    assert _sweep_with_valid(lambda lr: lr, extend=0)[:2] == (0.1, [])


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
    append_summary(tmp_path, _fake_result("w0-0"), "em")  # a run already listed is not listed twice
    assert len((tmp_path / "summary.tsv").read_text().splitlines()) == 81
    (tmp_path / "summary.tsv").write_text("old\theader\n")
    append_summary(tmp_path, _fake_result("new"), "em")
    assert len(list(tmp_path.glob("summary.*.tsv.bak"))) == 1
    assert len((tmp_path / "summary.tsv").read_text().splitlines()) == 2


def _preset_model(name: str):
    if name == "stories":
        require_asset(stories260k_dir())
        from conftest import fresh_model
        return fresh_model("stories")
    return tiny.build_model(tiny.TinySpec(), tiny.CharTokenizer())  # untrained: attaching only needs the shapes


@pytest.mark.parametrize("preset", ["tiny", "stories"])
def test_every_rows_bench_settings_attach_to_its_presets_model(preset, tmp_path):
    # OFT's block_size=32 and BOFT's 4·2 do not divide stories260K's 172-wide down_proj: a default that refuses
    # the preset's own model loses the method's whole row, so every row of the default session is attached here.
    from lora_lite.bench.cli import build_parser
    from lora_lite.bench.plan import resolve
    from variant_cases import gsm8k_batches
    plan = resolve(build_parser().parse_args(["--preset", preset, "--output-dir", str(tmp_path),
                                              *(["--cache-dir", str(tmp_path / "cache")] if preset == "tiny" else [])]))
    assert len(plan.methods) == len(ll.REGISTRY) + len(presets.OPTION_ROWS)
    model = _preset_model(preset)
    calibration = gsm8k_batches(model, n_batches=1, batch_size=2, max_length=24)
    for method in plan.methods:
        try:
            ll.attach(model, method.settings.cfg, calibration_data=calibration)
        except ll.LoraLiteError as e:
            pytest.fail(f"{method.variant} on the {preset} preset: {e}")
        ll.detach(model)
