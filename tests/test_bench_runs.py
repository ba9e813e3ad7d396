"""End-to-end smoke runs of `lora-lite bench` (tiny, stories, probe) and the long-run machinery: resume,
Ctrl-C, divergence. Sizes are cut to a few steps; the real presets differ only in their numbers."""

import dataclasses
import json
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")

import lora_lite as ll  # noqa: E402
from conftest import require_asset  # noqa: E402
from lora_lite.bench.cli import main  # noqa: E402
from lora_lite.bench.presets import OPTION_ROWS, PRESETS, variant_settings  # noqa: E402
from lora_lite.bench.run import Bench, Options  # noqa: E402
from lora_lite.bench.train import Interrupted, StopFlag, latest_checkpoint  # noqa: E402
from lora_lite.shared_data import gsm8k_file, stories260k_dir  # noqa: E402

TINY = ["--preset", "tiny", "--pretrain-steps", "4", "--steps", "2", "--batch-size", "4", "--max-test", "8",
        "--max-valid", "4", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


def _rows(out):
    return [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:]]


def test_tiny_smoke_every_variant(tmp_path, cache):
    assert main([*TINY, "--output-dir", str(tmp_path), "--cache-dir", str(cache)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| base (untrained) |" in table
    for name in ll.REGISTRY:
        assert f"| {name} |" in table
        for seed in (0,):
            run = next(tmp_path.glob(f"tiny-*__{name}__s2__seed{seed}"))
            result = json.loads((run / "result.json").read_text())
            assert result["status"] == "ok" and result["adapter_delta"] > 0 and result["trainable_params"] > 0
            assert len(result["test"]["acc_scores"]) == 8 and (run / "adapter.safetensors").is_file()
            assert not (run / "checkpoint").exists()
    for spec in OPTION_ROWS:  # e.g. lora:use_rslora=true, a row of its own
        assert f"| {spec} |" in table
        result = json.loads(next(tmp_path.glob(f"tiny-*__{spec.replace(':', '+')}__s2__seed0/result.json")).read_text())
        assert result["status"] == "ok" and result["config"][spec.split(":")[1].split("=")[0]] is True
    assert len(_rows(tmp_path)) == len(ll.REGISTRY) + len(OPTION_ROWS)
    assert (tmp_path / "acc_vs_params.png").stat().st_size > 1000
    # a rerun reuses finished runs instead of training again
    assert main([*TINY, "--variants", "lora", "--output-dir", str(tmp_path), "--cache-dir", str(cache)]) == 0
    assert len(_rows(tmp_path)) == len(ll.REGISTRY) + len(OPTION_ROWS)
    # ... but never a run made with other settings under the same run_id (alpha is not part of the name)
    assert main([*TINY, "--variants", "lora", "--alpha", "3", "--output-dir", str(tmp_path),
                 "--cache-dir", str(cache)]) == 1


def test_tiny_lr_sweep_picks_on_valid_then_runs_the_other_seeds(tmp_path, cache):
    args = [*TINY, "--variants", "lora", "--lr-sweep", "--lr-points", "2", "--lr-decades", "0.5",
            "--seeds", "0", "1", "--output-dir", str(tmp_path), "--cache-dir", str(cache)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    for row in rows:
        assert len(row["lrs_tried"]) == 2 and row["lr"] in row["lrs_tried"] and row["seeds"] == [0, 1]
    assert len(_rows(tmp_path)) == 3  # two lrs at seed 0, then seed 1 at the picked lr


def test_probe_mode_every_variant(tmp_path, cache, capsys):
    assert main([*TINY, "--mode", "probe", "--output-dir", str(tmp_path), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for name in ll.REGISTRY:
        assert f"probe {name}: perturb" in out
        result = json.loads(next(tmp_path.glob(f"probe__*__{name}__*/result.json")).read_text())
        assert result["perturb_logit_delta"] > 1e-7 and result["reload_max_logit_diff"] < 2e-2


def test_stories_smoke(tmp_path):
    require_asset(stories260k_dir() / "model.safetensors")
    require_asset(gsm8k_file("train"))
    args = ["--preset", "stories", "--variants", "lora", "ia3_ff", "--steps", "2", "--batch-size", "2",
            "--max-test", "6", "--max-valid", "4", "--max-new-tokens", "8",
            "--output-dir", str(tmp_path)]
    assert main(args) == 0
    table = (tmp_path / "results.md").read_text()
    assert "answer NLL" in table and "| lora |" in table and "| ia3_ff |" in table
    result = json.loads(next(tmp_path.glob("stories260k__lora__*/result.json")).read_text())
    assert len(result["test"]["nll_scores"]) == 6 and all(v > 0 for v in result["test"]["nll_scores"])
    assert result["forgetting"] == pytest.approx(result["forgetting"])  # finite
    base = json.loads(next(tmp_path.glob("stories260k__base/result.json")).read_text())
    assert base["test"]["nll"] != result["test"]["nll"]


def _bench(out, cache, steps=6, checkpoint_every=0):
    preset = dataclasses.replace(PRESETS["tiny"], steps=steps, batch_size=4, max_test=4, max_valid=4,
                                 forget_n=4, forget_len=16, checkpoint_every=checkpoint_every)
    return Bench(Options(preset=preset, output_dir=out, cache_dir=cache, pretrain_steps=4), log=lambda *a: None)


def _adapter(run_dir):
    return ll.io.read_adapter_file(run_dir / "adapter.safetensors")["default"][2]


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_interrupted_then_resumed_run_ends_with_the_same_adapter(tmp_path, cache, variant):
    bench = _bench(tmp_path / "straight", cache)
    vs = variant_settings(variant, bench.p)
    straight = bench.run(vs, seed=0)
    bench.opt.output_dir = tmp_path / "interrupted"

    def stop_at_3(step, stop):
        if step == 3:
            stop.set()

    with pytest.raises(Interrupted, match="stopped at step 3/6"):
        bench.run(vs, seed=0, on_step=stop_at_3)
    run_dir = bench.opt.output_dir / straight["run_id"]
    assert latest_checkpoint(run_dir).name == "step-000003" and not (run_dir / "result.json").exists()
    resumed = bench.run(vs, seed=0)
    assert resumed["train"]["resumed_from_step"] == 3
    assert resumed["train"]["losses"] == straight["train"]["losses"]
    a, b = _adapter(tmp_path / "straight" / straight["run_id"]), _adapter(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"]["acc_scores"] == straight["test"]["acc_scores"]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, cache):
    bench = _bench(tmp_path, cache, steps=5, checkpoint_every=1)
    calls = {"n": 0}

    def poison(module, args, output):  # the 3rd training forward (step 2) sees NaN activations
        if module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return output * float("nan")
        return output

    handle = bench.model.model.embed_tokens.register_forward_hook(poison)
    try:
        result = bench.run(variant_settings("lora", bench.p), seed=0)
    finally:
        handle.remove()
    assert result["status"] == "diverged" and "diverged at step 2: loss is nan" in result["error"]
    ckpt = latest_checkpoint(tmp_path / result["run_id"])
    assert ckpt.name == "step-000002"
    tensors = ll.io.read_adapter_file(ckpt / "adapter.safetensors")["default"][2]
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_ctrl_c_sets_the_stop_flag_and_a_second_one_aborts():
    flag = StopFlag()
    previous = flag.install_sigint()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.is_set
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
