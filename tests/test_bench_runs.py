"""End-to-end smoke runs of `lora-lite bench` (tiny, stories, probe) and the long-run machinery: reuse only under
the same settings, resume, Ctrl-C / SIGTERM, divergence, damaged files. Sizes are cut to a few steps; the real
presets differ only in their numbers."""

import dataclasses
import json
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")

import lora_lite as ll  # noqa: E402
from conftest import require_asset  # noqa: E402
from lora_lite.bench import tiny  # noqa: E402
from lora_lite.bench.cli import main  # noqa: E402
from lora_lite.bench.presets import OPTION_ROWS, PRESETS, variant_settings  # noqa: E402
from lora_lite.bench.run import Bench, Options  # noqa: E402
from lora_lite.bench.train import Interrupted, StopFlag, latest_checkpoint  # noqa: E402
from lora_lite.errors import CheckpointError  # noqa: E402
from lora_lite.shared_data import gsm8k_file, stories260k_dir  # noqa: E402

TINY = ["--preset", "tiny", "--pretrain-steps", "4", "--steps", "2", "--batch-size", "4", "--max-test", "8",
        "--max-valid", "4", "--max-new-tokens", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


def _rows(out):
    return [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:]]


def _bench_main(out, cache, *extra):
    return main([*TINY, *extra, "--output-dir", str(out), "--cache-dir", str(cache)])


def _results(out):
    return json.loads((out / "results.json").read_text())


def _result(run_dir):
    return json.loads((run_dir / "result.json").read_text())


def test_tiny_smoke_every_variant(tmp_path, cache, capsys):
    assert _bench_main(tmp_path, cache) == 0
    out = capsys.readouterr().out
    n_rows = len(ll.REGISTRY) + len(OPTION_ROWS)  # every method, plus a row per option (lora:use_rslora=true)
    assert "expected time: about" in out and f"{n_rows} runs" in out  # the plan comes first
    table = (tmp_path / "results.md").read_text()
    assert "| base (untrained) |" in table and "McNemar, 1 seed" in table
    for k, name in enumerate(sorted(ll.REGISTRY), 1):
        assert f"| {name} |" in table
        assert f"[{k}/{n_rows}] {name} lr " in out  # every run names its method and phase
        run = next(tmp_path.glob(f"tiny-*__{name}__lr*__seed0__*"))
        result = _result(run)
        assert result["status"] == "ok" and result["adapter_delta"] > 0 and result["trainable_params"] > 0
        assert len(result["test"]["acc_scores"]) == 8 and (run / "adapter.safetensors").is_file()
        assert not (run / "checkpoint").exists()
    for spec in OPTION_ROWS:  # a row of its own, under its own folder, with the option set in its config
        assert f"| {spec} |" in table
        result = _result(next(tmp_path.glob(f"tiny-*__{spec.replace(':', '+')}__lr*__seed0__*")))
        field = spec.split(":")[1].split("=")[0]
        assert result["status"] == "ok" and result["variant"] == spec and result["config"][field] is True
    assert "scoring valid (4 questions)" in out and "forgetting (32 texts)" in out
    assert len(_rows(tmp_path)) == n_rows
    assert (tmp_path / "acc_vs_params.png").stat().st_size > 1000
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores) == n_rows + 1 and all(len(v["test"]) == 8 for v in scores.values())
    # a rerun reuses finished runs instead of training again
    assert _bench_main(tmp_path, cache, "--variants", "lora") == 0
    assert "finished earlier (ok)" in capsys.readouterr().out and len(_rows(tmp_path)) == n_rows


def test_environment_is_recorded_and_keys_the_tiny_base(tmp_path, cache):
    assert _bench_main(tmp_path, cache, "--variants", "lora") == 0
    result = _result(next(tmp_path.glob("tiny-*__lora__*")))
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] and "dirty" in env and env["device_name"]
    assert result["settings"]["env"]["torch"] == torch.__version__
    assert tiny.TinySpec().cache_record()["torch"] == torch.__version__  # another torch, another base
    assert _results(tmp_path)["environment"]["commit"] == env["commit"]


def test_changed_settings_never_reuse_earlier_runs(tmp_path, cache):
    """Rerun into the same folder with other eval and batch settings: new runs and a new base, titled right."""
    assert _bench_main(tmp_path, cache, "--variants", "lora") == 0
    first = _results(tmp_path)
    assert _bench_main(tmp_path, cache, "--variants", "lora", "--max-test", "6", "--max-new-tokens", "4",
                       "--batch-size", "2", "--alpha", "3") == 0
    second = _results(tmp_path)
    assert second["rows"][0]["per_seed"][0]["run_id"] != first["rows"][0]["per_seed"][0]["run_id"]
    assert second["base"]["run_id"] != first["base"]["run_id"]
    result = _result(tmp_path / second["rows"][0]["per_seed"][0]["run_id"])
    assert len(result["test"]["acc_scores"]) == 6 and result["alpha"] == 3.0
    assert result["settings"]["batch_size"] == 2 and result["settings"]["max_new_tokens"] == 4
    assert "x batch 2" in (tmp_path / "results.md").read_text()
    assert len(_rows(tmp_path)) == 2


def _bench(out, cache, steps=6, checkpoint_every=0, **changes):
    sizes = {"batch_size": 4, "max_test": 4, "max_valid": 4, "forget_n": 4, "forget_len": 16, **changes}
    preset = dataclasses.replace(PRESETS["tiny"], steps=steps, checkpoint_every=checkpoint_every, **sizes)
    return Bench(Options(preset=preset, output_dir=out, cache_dir=cache, pretrain_steps=4), log=lambda *a: None)


def _adapter(run_dir):
    return ll.io.read_adapter_file(run_dir / "adapter.safetensors")["default"][2]


def _stop_at(n):
    def on_step(step, stop):
        if step == n:
            stop.set()
    return on_step


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_interrupted_then_resumed_run_ends_with_the_same_adapter(tmp_path, cache, variant):
    bench = _bench(tmp_path / "straight", cache)
    vs = variant_settings(variant, bench.p)
    straight = bench.run(vs, seed=0)
    bench.opt.output_dir = tmp_path / "interrupted"
    with pytest.raises(Interrupted, match="stopped at step 3/6"):
        bench.run(vs, seed=0, on_step=_stop_at(3))
    run_dir = bench.opt.output_dir / straight["run_id"]
    assert latest_checkpoint(run_dir).name == "step-000003" and not (run_dir / "result.json").exists()
    resumed = bench.run(vs, seed=0)
    assert resumed["train"]["resumed_from_step"] == 3
    assert resumed["train"]["losses"] == straight["train"]["losses"]
    a, b = _adapter(tmp_path / "straight" / straight["run_id"]), _adapter(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"]["acc_scores"] == straight["test"]["acc_scores"]


def test_a_checkpoint_is_resumed_only_by_the_settings_that_wrote_it(tmp_path, cache):
    """Killed with alpha 16, rerun with alpha 32 (or another batch size): a fresh run, not the old adapter."""
    bench = _bench(tmp_path, cache)
    vs16 = variant_settings("lora", bench.p, alpha=16.0)
    with pytest.raises(Interrupted):
        bench.run(vs16, seed=0, on_step=_stop_at(3))
    vs32 = variant_settings("lora", bench.p, alpha=32.0)
    result = bench.run(vs32, seed=0)
    assert result["alpha"] == 32.0 and result["train"]["resumed_from_step"] == 0
    assert result["run_id"] != bench.run_id(vs16, 0)
    other_batch = _bench(tmp_path, cache, batch_size=2)
    assert other_batch.run_id(vs16, 0) != bench.run_id(vs16, 0)
    # a checkpoint moved into another run's folder is refused, not resumed
    with pytest.raises(Interrupted):
        other_batch.run(vs16, seed=0, on_step=_stop_at(2))
    stolen = tmp_path / other_batch.run_id(vs16, 0) / "checkpoint"
    target = tmp_path / bench.run_id(vs16, 0) / "checkpoint"
    import shutil
    shutil.rmtree(target)
    shutil.copytree(stolen, target)
    with pytest.raises(CheckpointError, match="written by other settings"):
        bench.run(vs16, seed=0)


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


def test_a_diverged_method_does_not_kill_the_report(tmp_path, cache, capsys):
    args = ("--variants", "lora", "pissa", "--steps", "3")
    assert _bench_main(tmp_path, cache, *args, "--lr", "1e6") == 0
    table = (tmp_path / "results.md").read_text()
    assert "diverged at every lr tried (1e+06)" in table
    assert _bench_main(tmp_path, cache, *args, "--lr", "1e6") == 0  # the rerun reuses the diverged runs
    assert "finished earlier (diverged)" in capsys.readouterr().out
    assert [r[17] for r in _rows(tmp_path)].count("diverged") >= 1


def test_a_summary_row_lost_to_a_kill_comes_back(tmp_path, cache):
    assert _bench_main(tmp_path, cache, "--variants", "lora") == 0
    summary = tmp_path / "summary.tsv"
    summary.write_text(summary.read_text().splitlines()[0] + "\n")  # killed after result.json, before the row
    assert _bench_main(tmp_path, cache, "--variants", "lora") == 0
    assert len(_rows(tmp_path)) == 1


def _checkpointed_run(tmp_path, cache):
    bench = _bench(tmp_path, cache)
    vs = variant_settings("lora", bench.p)
    with pytest.raises(Interrupted):
        bench.run(vs, seed=0, on_step=_stop_at(3))
    return bench, vs, latest_checkpoint(tmp_path / bench.run_id(vs, 0))


@pytest.mark.parametrize("damage", ["latest.json", "state.json", "state-step", "optimizer.safetensors",
                                    "optimizer-empty", "result.json"])
def test_damaged_files_are_one_clear_error(tmp_path, cache, damage):
    bench, vs, ckpt = _checkpointed_run(tmp_path, cache)
    from safetensors.torch import save_file
    if damage == "latest.json":
        (ckpt.parent / "latest.json").write_text("{not json")
    elif damage == "state.json":
        (ckpt / "state.json").write_text("[]")
    elif damage == "state-step":
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "step": 99}))
    elif damage == "optimizer.safetensors":
        (ckpt / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    elif damage == "optimizer-empty":
        save_file({}, str(ckpt / "optimizer.safetensors"))
    else:
        (tmp_path / bench.run_id(vs, 0) / "result.json").write_text('{"status": "ok", ')
    with pytest.raises(CheckpointError) as info:
        bench.run(vs, seed=0)
    message = str(info.value)
    assert "\n" not in message and ("delete" in message or "--overwrite" in message)


def test_damaged_files_end_the_command_with_one_line(tmp_path, cache, capsys):
    assert _bench_main(tmp_path, cache, "--variants", "lora") == 0
    run = next(tmp_path.glob("tiny-*__lora__*"))
    (run / "result.json").write_text("{")
    assert _bench_main(tmp_path, cache, "--variants", "lora") == 1
    err = capsys.readouterr().err
    assert "FAILED: CheckpointError" in err and "Traceback" not in err
    assert "Failed runs" in (tmp_path / "results.md").read_text()


def test_sigterm_writes_a_checkpoint_like_ctrl_c(tmp_path, cache):
    caught = []
    previous = signal.signal(signal.SIGTERM, lambda *a: caught.append("default"))  # must be replaced by the bench's
    try:
        bench = _bench(tmp_path, cache)
        vs = variant_settings("lora", bench.p)
        stop = StopFlag()
        handlers = stop.install()

        def sigterm_at_2(step, flag):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            with pytest.raises(Interrupted) as info:
                bench.run(vs, seed=0, stop=stop, on_step=sigterm_at_2)
        finally:
            StopFlag.restore(handlers)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not caught and info.value.exit_code == 128 + signal.SIGTERM
    assert latest_checkpoint(tmp_path / bench.run_id(vs, 0)).name == "step-000002"


def test_ctrl_c_sets_the_stop_flag_and_a_second_one_aborts():
    flag = StopFlag()
    previous = flag.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.is_set
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        StopFlag.restore(previous)


def test_the_tiny_base_cache_is_checked_tensor_by_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    spec = tiny.TinySpec(pretrain_steps=4)
    tiny.pretrained_base(spec, tmp_path, log=lambda *a: None)
    path = tmp_path / f"tiny-base-{spec.key()}.safetensors"
    state = load_file(str(path))
    state.pop("model.norm.weight")
    save_file(state, str(path), metadata={"spec": json.dumps(spec.cache_record(), sort_keys=True)})
    with pytest.raises(CheckpointError, match="does not fit the model"):
        tiny.pretrained_base(spec, tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        tiny.pretrained_base(spec, tmp_path)
    assert main([*TINY, "--variants", "lora", "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]) == 1
    assert "unreadable" in capsys.readouterr().err


def test_bf16_base_trains_fp32_adapters_whose_every_entry_moves(tmp_path, cache):
    """In bf16 at a small lr most lora_A entries never change (the update is below bf16's resolution); the
    bench's adapters are fp32 unless asked otherwise, on any base dtype."""
    common = ("--variants", "lora", "--dtype", "bfloat16", "--lr", "1e-4", "--steps", "3")
    assert _bench_main(tmp_path, cache, *common) == 0
    run = next(tmp_path.glob("tiny-*__lora__*"))
    fp32 = _result(run)
    assert fp32["settings"]["dtype"] == "bfloat16" and {t.dtype for t in _adapter(run).values()} == {torch.float32}
    assert fp32["adapter_unchanged"]["lora_A"] < 0.01
    assert _bench_main(tmp_path / "bf16", cache, *common, "--set", "dtype=bfloat16") == 0
    run = next((tmp_path / "bf16").glob("tiny-*__lora__*"))
    bf16 = _result(run)
    assert bf16["config"]["dtype"] == "bfloat16" and {t.dtype for t in _adapter(run).values()} == {torch.bfloat16}
    assert bf16["adapter_unchanged"]["lora_A"] > 0.3


def test_tiny_lr_sweep_picks_on_valid_then_runs_the_other_seeds(tmp_path, cache):
    assert _bench_main(tmp_path, cache, "--variants", "lora", "--lr-sweep", "--lr-points", "2", "--lr-decades", "0.5",
                       "--lr-extend", "0", "--seeds", "0", "1") == 0
    record = _results(tmp_path)
    row, = record["rows"]
    assert len(row["lrs_tried"]) == 2 and row["lr"] == record["picks"]["lora"] and row["seeds"] == [0, 1]
    assert [s["seed"] for s in row["per_seed"]] == [0, 1] and all("test" in s for s in row["per_seed"])
    assert len(_rows(tmp_path)) == 3  # two lrs at seed 0, then seed 1 at the picked lr


def test_probe_mode_every_variant(tmp_path, cache, capsys):
    assert main([*TINY[:8], "--threads", "1", "--mode", "probe", "--output-dir", str(tmp_path),
                 "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for name in ll.REGISTRY:
        assert f"probe {name}: perturb" in out
        result = json.loads(next(tmp_path.glob(f"probe__*__{name}__*/result.json")).read_text())
        assert result["perturb_logit_delta"] > 1e-7 and result["reload_max_logit_diff"] < 2e-2


def test_stories_smoke_leaves_out_long_examples_and_says_so(tmp_path, capsys):
    require_asset(stories260k_dir() / "model.safetensors")
    require_asset(gsm8k_file("train"))
    args = ["--preset", "stories", "--variants", "lora", "ia3_ff", "--steps", "2", "--batch-size", "2",
            "--max-test", "6", "--max-valid", "4", "--max-new-tokens", "8", "--max-seq-length", "200",
            "--threads", "1", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "Token indices sequence length" not in out.out + out.err  # our own count replaces that warning
    assert "longer than max_seq_length=200 tokens and are left out" in out.out
    table = (tmp_path / "results.md").read_text()
    assert "answer NLL" in table and "| lora |" in table and "| ia3_ff |" in table
    result = _result(next(tmp_path.glob("stories260k__lora__*")))
    assert len(result["test"]["nll_scores"]) == 6 and all(v > 0 for v in result["test"]["nll_scores"])
    data = result["data"]
    assert data["test"]["scored"] == 6 and data["test"]["too_long"] > 0 and data["train"]["too_long"] > 0
    base = _result(next(tmp_path.glob("stories260k__base__*")))
    assert base["test"]["nll"] != result["test"]["nll"]
