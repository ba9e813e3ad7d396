"""What the bench and the cost report show: plot labels that do not collide, CI bars inside the metric's range,
a plot written under a name of its own, NLL in bounded chunks equal to the plain computation, and a cost table
whose columns agree and whose ratios within the noise read as ties."""

import itertools

import pytest
import torch

pytest.importorskip("matplotlib")

from lora_lite.bench import evaluate as ev  # noqa: E402
from lora_lite.cost.cli import render  # noqa: E402

# lora_lite.bench.plot is imported inside the tests, so this file also runs against older code.

# The published tiny table's crowded corner: many methods near the base at few parameters, three at ~26k.
CROWDED = [("lora", 26112, 90.3), ("pissa", 26112, 87.2), ("dora", 27840, 84.7), ("eva", 26112, 74.3),
           ("lora_xs", 1344, 57.0), ("hra", 12288, 54.8), ("antipasto_dplr", 2856, 48.8), ("delora", 26133, 48.8),
           ("road", 1728, 30.2), ("ia3", 384, 14.0), ("antipasto", 420, 12.0), ("antipasto_ablate", 189, 9.7),
           ("ia3_ff", 384, 9.7), ("antipasto_corda", 168, 9.5), ("antipasto_asvd", 168, 8.5),
           ("antipasto_gain", 168, 8.0)]


def test_plot_labels_never_overlap():
    import matplotlib

    from lora_lite.bench.plot import place_labels
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 5.0), dpi=120)
    ax.plot([x for _, x, _ in CROWDED], [y for _, _, y in CROWDED], "o")
    ax.set_xscale("log")
    ax.set_xlim(50, 1e5)
    ax.set_ylim(-3, 103)
    texts = place_labels(ax, [(x, y) for _, x, y in CROWDED], [n for n, _, _ in CROWDED])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert [t.get_text() for t in texts] == sorted((n for n, _, _ in CROWDED), key=lambda n: next(
        (y, x) for m, x, y in CROWDED if m == n))
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (texts[i].get_text(), texts[j].get_text())
    plt.close(fig)


def test_ci_bars_stay_inside_the_metric_range():
    from lora_lite.bench.plot import clipped_yerr

    assert clipped_yerr(98.0, 10.0, "em") == (10.0, 2.0)
    assert clipped_yerr(3.0, 10.0, "em") == (3.0, 10.0)
    assert clipped_yerr(0.5, 2.0, "nll") == (0.5, 2.0)


def test_the_plot_writes_through_a_temp_name_of_its_own(tmp_path):
    from lora_lite.bench.plot import plot

    (tmp_path / "acc_vs_params.tmp.png").mkdir()  # the old fixed temp name, taken by another writer
    rows = [{"variant": n, "trainable_params": x, "test": (y, 12.0)} for n, x, y in CROWDED]
    path = plot({"test": {"acc": 8.0}}, rows, "em", tmp_path / "acc_vs_params.png", "crowded")
    assert path.stat().st_size > 1000 and sorted(p.name for p in tmp_path.iterdir()) == [
        "acc_vs_params.png", "acc_vs_params.tmp.png"]


def test_nll_in_bounded_chunks_equals_the_plain_computation(tiny_qwen):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 3)]
    labels = [[-100] + s[1:] for s in seqs]
    plain = []
    with torch.no_grad():
        for s in seqs:
            logits = tiny_qwen(input_ids=torch.tensor([s])).logits[0, :-1].float()
            plain.append(torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:])).item())
    for budget in (ev.LOGIT_BUDGET, 128 * 4, 1):  # one batch; 4 tokens at a time; one token and one row at a time
        chunked = ev.token_nll(tiny_qwen, seqs, labels, pad_id=0, batch_size=3, budget=budget)
        assert chunked == pytest.approx(plain, rel=1e-5, abs=1e-5)


def _cost_row(name, step, floor):
    return {"variant": name, "params": 10, "file_mb": 0.1, "macs": 1000, "init_ms": 1.0, "fwd": 1.0, "step": step,
            "floor_step": floor, "floor_fwd": 1.0, "ratio": step / floor, "ideal": 1.1, "peak_mb": 1.0}


def test_cost_columns_agree_and_noise_reads_as_a_tie():
    rows = [_cost_row("a", 10.2, 10.0), _cost_row("b", 10.1, 10.4), _cost_row("c", 15.0, 9.8)]
    table = render(rows, 1.0, ["header"], compare_peft=False)
    lines = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    for name in "abc":
        cells = lines[name]
        step, floor = float(cells[6]), float(cells[7])
        assert cells[8].strip("*").split()[0] == f"{step / floor:.2f}"  # step ms ÷ floor step ms = the ratio
    assert "(tie)" in lines["a"][8] and "(tie)" in lines["b"][8] and lines["c"][8] == "**1.53**"
    assert "±3%" in table
    few = render(rows[:2], 1.0, ["header"], compare_peft=False)
    assert "not estimated" in few and "(tie)" not in few and "below floor: noise" in few
