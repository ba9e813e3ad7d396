"""Property-based fuzzing of both command lines' argument handling: random argv lists built from the real flags
and from good, bad and odd values never end in a traceback. Each one is either refused in one line on stderr
with exit status 2, or resolved into a valid plan (bench: `--plan-only`, which prints the plan and does no
work; cost: `resolve`, which builds the configs and measures nothing).

Derandomized with no example database, so CI sees the same examples every time; each test asserts how many ran.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

import lora_lite as ll  # noqa: E402
from lora_lite.bench.cli import build_parser as bench_parser  # noqa: E402
from lora_lite.bench.cli import main as bench_main  # noqa: E402
from lora_lite.cost.cli import build_parser as cost_parser  # noqa: E402

N_EXAMPLES = 250
RUNS: dict[str, int] = {}


BAD = ["0", "-1", "nan", "inf", "abc", "", "lorra", "(", "/nonexistent/path", "group_size=abc", "niter=4.0",
       "pissa:niter=abc", "x=y=z", "=", "KEY", "1e400", "cuda:7"]
GOOD = {
    "--variants": ["lora", "pissa", "dora", "hra", "pissa:svd=full", "pissa:svd=lowrank,niter=2", "road:group_size=16"],
    "--set": ["group_size=32", "niter=2", "dtype=float32", "dtype=bfloat16", "lambda0=0.1", "svd=full"],
    "--targets": ["down_proj$", "q_proj", "(k_proj|v_proj)$"], "--seeds": ["0", "1", "2"],
    "--device": ["auto", "cpu"], "--threads": ["auto", "1", "2"], "--lr": ["0.01", "1e-3", "3"],
    "--alpha": ["8", "16.5"], "--lr-decades": ["0.5", "1"], "--reload-tol": ["0.02"],
    "--model": ["tiny"], "--train-data": ["tiny"], "--eval-data": ["tiny"], "--forget-data": ["self"],
}
NUMBERS = ["1", "2", "3", "8"]


def _flag_strategy(action, paths):
    """A flag and its values: mostly ones it accepts, sometimes ones it must refuse."""
    flag = action.option_strings[-1]
    if action.nargs == 0:
        good = st.just([])
    else:
        pool = list(action.choices) if action.choices else GOOD.get(flag, paths if "dir" in flag or flag == "--out"
                                                                    else NUMBERS)
        count = 1 if action.nargs is None else 2
        good = st.lists(st.sampled_from(pool), min_size=1, max_size=count)
    bad = st.lists(st.one_of(st.sampled_from(BAD + paths), st.text(max_size=5)), max_size=2)
    return st.tuples(st.just(flag), st.one_of(good, good, good, bad))


def _argv(parser, paths):
    actions = [a for a in parser._actions if a.option_strings and a.option_strings[0] not in ("-h", "--help")]
    pairs = st.lists(st.one_of(*(_flag_strategy(a, paths) for a in actions)), max_size=5)
    return pairs.map(lambda ps: [token for flag, values in ps for token in (flag, *values)])


def _fuzz(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _outcome(call) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = call()
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def _check(code, err, argv):
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (argv, err)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-cli")
    (root / "a-file").write_text("x")
    return [str(root / "out"), str(root / "a-file"), str(root / "a-file" / "below"), str(root / "cost.md")]


def test_bench_argv_never_tracebacks(paths, monkeypatch):
    monkeypatch.setenv("LORA_LITE_CACHE", paths[0])

    @_fuzz(N_EXAMPLES)
    @given(_argv(bench_parser(), paths))
    def check(argv):
        RUNS["bench"] = RUNS.get("bench", 0) + 1
        argv = [*argv, "--plan-only"]  # a plan prints what it would do and does none of it
        code, err = _outcome(lambda: bench_main(argv))
        _check(code, err, argv)

    check()
    assert RUNS["bench"] == N_EXAMPLES


def test_cost_argv_never_tracebacks(paths):

    from lora_lite.cost.cli import prepare as cost_prepare  # here, so the file also runs against older code

    def resolve_only(argv):  # what `lora-lite cost` does before it builds or measures anything
        prepared = cost_prepare(argv)
        if isinstance(prepared, int):
            return prepared
        _, shape, cfgs = prepared
        assert cfgs and all(isinstance(c, ll.AdapterConfig) for c in cfgs) and shape.hidden > 0
        return 0

    @_fuzz(N_EXAMPLES)
    @given(_argv(cost_parser(), paths))
    def check(argv):
        RUNS["cost"] = RUNS.get("cost", 0) + 1
        code, err = _outcome(lambda: resolve_only(argv))
        _check(code, err, argv)

    check()
    assert RUNS["cost"] == N_EXAMPLES
