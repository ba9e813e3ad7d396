"""Both command lines turn every bad value into one line on stderr (exit 2) before any work starts; knobs are
typed by one rule in bench and cost; the plan says what a session will do and about how long it takes."""

import os
import stat

import pytest

pytest.importorskip("transformers")

import lora_lite as ll  # noqa: E402
from lora_lite.bench.cli import build_parser  # noqa: E402
from lora_lite.bench.cli import main as bench_main  # noqa: E402
from lora_lite.bench.presets import OPTION_ROWS  # noqa: E402
from lora_lite.cost.cli import main as cost_main  # noqa: E402


def resolve(args):
    from lora_lite.bench.plan import resolve as resolve_plan  # here, so the file also runs against older code
    return resolve_plan(args)

QUICK = ["--steps", "2", "--max-test", "4", "--max-valid", "2", "--threads", "1"]


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _run(main, argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    yield d
    d.chmod(stat.S_IRWXU)


BAD_BENCH = [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"), (["--grad-accum", "0"], "--grad-accum"),
    (["--set", "group_size=abc"], "group_size"), (["--threads", "-1"], "--threads"),
    (["--seeds", "0", "0"], "--seeds"), (["--variants", "lorra"], "lorra"), (["--set", "niter=4.0"], "niter"),
    (["--model", "/nonexistent/model"], "--model"), (["--lr-points", "3"], "--lr-sweep"),
    (["--lr-extend", "1"], "--lr-sweep"),
    (["--preset", "stories", "--pretrain-steps", "3"], "--pretrain-steps"), (["--mode", "probe", "--seeds", "1"],
                                                                            "probe"),
    (["--reload-tol", "0.1"], "probe"), (["--full", "--seeds", "0"], "--full"), (["--set", "r=4"], "--r"),
    (["--device", "tpu"], "--device"), (["--set", "lambda0"], "KEY=VALUE"), (["--targets", "("], "regular"),
]


@pytest.mark.parametrize("argv,needle", BAD_BENCH, ids=[" ".join(a) for a, _ in BAD_BENCH])
def test_bench_refuses_bad_values_in_one_line(argv, needle, capsys, tmp_path):
    rc = _run(bench_main, [*argv, "--output-dir", str(tmp_path / "out")])
    _one_line_error(capsys, rc, needle)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_bench_refuses_an_output_dir_it_cannot_write(capsys, tmp_path, read_only_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = _run(bench_main, ["--output-dir", str(blocker / "out")])
    _one_line_error(capsys, rc, "is a file")
    if os.geteuid() != 0:  # root writes anywhere
        rc = _run(bench_main, ["--output-dir", str(read_only_dir / "out")])
        _one_line_error(capsys, rc, "not writable")


BAD_COST = [
    (["--variants", "nosuch"], "nosuch"), (["--variants", "lorra"], "lorra"),
    (["--variants", "pissa:niter=abc"], "niter"), (["--variants", "pissa:niter=4.0"], "niter"),
    (["--r", "0"], "--r"), (["--iters", "0"], "--iters"), (["--svd-size", "0", "--svd-niter", "2"], "--svd-niter"),
    (["--clock", "cpu", "--device", "cuda"], "--clock"), (["--heads", "3"], "--heads"),
]


@pytest.mark.parametrize("argv,needle", BAD_COST, ids=[" ".join(a) for a, _ in BAD_COST])
def test_cost_refuses_bad_values_in_one_line(argv, needle, capsys):
    _one_line_error(capsys, _run(cost_main, argv), needle)


def test_cost_refuses_an_unwritable_out_before_measuring(capsys, tmp_path, read_only_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_line_error(capsys, _run(cost_main, ["--out", str(blocker / "cost.md")]), "is a file")
    if os.geteuid() != 0:
        _one_line_error(capsys, _run(cost_main, ["--out", str(read_only_dir / "cost.md")]), "not writable")


def test_bench_and_cost_type_knobs_by_one_rule(capsys):
    bench_msg = _one_line_error(capsys, _run(bench_main, ["--variants", "pissa", "--set", "niter=4.0"]))
    cost_msg = _one_line_error(capsys, _run(cost_main, ["--variants", "pissa:niter=4.0"]))
    for msg in (bench_msg, cost_msg):
        assert "PiSSAConfig.niter must be an integer, got '4.0'" in msg
    plan = resolve(build_parser().parse_args(["--variants", "pissa", "--set", "niter=3", "svd=full"]))
    assert (plan.methods[0].settings.cfg.niter, plan.methods[0].settings.cfg.svd) == (3, "full")


def test_set_dtype_gives_float32_or_bfloat16_adapters():
    import torch

    for text, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("none", None)):
        plan = resolve(build_parser().parse_args(["--preset", "qwen", "--variants", "lora", "--set",
                                                  f"dtype={text}", "--model", ".", "--train-data", ".",
                                                  "--eval-data", ".", "--forget-data", "."]))
        assert plan.methods[0].settings.cfg.dtype is dtype


def test_the_plan_names_methods_runs_and_time(capsys, tmp_path):
    rc = bench_main(["--plan-only", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "cache").exists()
    n = len(ll.REGISTRY) + len(OPTION_ROWS)  # every method and every option row (lora:use_rslora=true)
    assert f"{n} method(s)" in out and f"{n} runs" in out and "expected time: about" in out
    assert "pre-training" in out and "lora-lite bench --full" in out
    rc = bench_main(["--plan-only", "--full", "--variants", "lora", "dora", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "lr sweep of 5 on seed 0, then seeds 1 2" in out and "2 method(s)" in out
    assert "14 runs" in out  # 2 x (5 lrs on seed 0 + 2 more seeds)
    assert "tries up to 2 more grid step(s) past it (--lr-extend): up to 4 more run(s) per method" in out


def test_device_defaults_to_auto():
    import torch

    plan = resolve(build_parser().parse_args(["--variants", "lora"]))
    assert plan.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_qwen_offline_names_the_flags_for_local_data(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    rc = _run(bench_main, ["--preset", "qwen", "--plan-only"])
    line = _one_line_error(capsys, rc, "offline", "--model DIR", "--train-data", "--eval-data", "--forget-data")
    assert "Qwen/Qwen3.5-0.8B-Base" in line and "openai/gsm8k" in line
