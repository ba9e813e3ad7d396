"""Every fenced block in README.md and docs/*.md is executed or checked, and every relative link resolves.

Blocks are found by parsing the pages (README.md plus docs/*.md, globbed), one pytest param per block, named
`file:line`. What happens to a block follows from its fence language and an optional mark, an HTML comment on
the line right before the fence:

    python                   run. A page's python blocks run in order in one subprocess (later blocks use names
                             from earlier ones), cwd a fresh tmp dir, offline, with LORA_LITE_SHARED set.
    <!-- snippet: module PATH -->
                             a python block that is the content of the file PATH (e.g. a new variant): imported
                             under PATH's dotted name, in the page's process.
    bash, sh, shell, console run with `bash -e` in a tmp dir (quick, safe commands only).
    <!-- snippet: check-only (reason) -->
                             a shell block too long to run here (a benchmark, an install, the whole suite): each
                             command's arguments are parsed by the program's own parser (snippet_argcheck.py),
                             pip requirements and extras are parsed against pyproject.toml, pytest selections
                             are collected, and every repository path the command names must exist.
    <!-- snippet: not-run (reason) -->
                             cannot run here at all (GPUs, several processes, a hub download). Must give a
                             reason, and there may be only a few.
    json                     must parse.
    text, plain fences       output and diagrams, not code: nothing to run.

Any other language fails, so a new kind of block is never passed over silently.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_asset
from lora_lite.shared_data import stories260k_dir

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHARED = os.environ.get("LORA_LITE_SHARED", str(ROOT.parent / "shared"))
PYTHON_LANGS, SHELL_LANGS, TEXT_LANGS = {"python"}, {"bash", "sh", "shell", "console"}, {"", "text"}
MARK = re.compile(r"<!--\s*snippet:\s*(?P<kind>[\w-]+)\s*(?:\((?P<reason>[^)]*(?:\([^)]*\)[^)]*)*)\)|(?P<arg>\S+))?\s*-->")
MAX_NOT_RUN = 4  # blocks that nothing executes: keep them rare, every one is a snippet that can rot unseen
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<lang>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    line: int  # the opening fence's line, 1-based
    lang: str
    code: str
    mark: str | None  # not-run, check-only, module or None
    mark_arg: str | None  # the reason, or module's path

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def parse_page(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one page, and the problems found while parsing (stray marks, unclosed fences)."""
    return parse_page_at(path, str(path.relative_to(ROOT)))


def parse_page_at(path: Path, rel: str | None = None) -> tuple[list[Block], list[str]]:
    lines, rel = path.read_text().splitlines(), rel or path.name
    blocks, problems, i = [], [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        mark = MARK.search(lines[i])
        if mark and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            problems.append(f"{rel}:{i + 1}: a snippet mark must be the line right before a fence")
        if not m:
            i += 1
            continue
        start, close = i, m.group("fence")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(close)
                    and not lines[j].strip().strip(close[0])), None)
        if end is None:
            problems.append(f"{rel}:{start + 1}: fence never closed")
            break
        prev = MARK.search(lines[start - 1]) if start else None
        kind = prev.group("kind") if prev else None
        arg = (prev.group("reason") or prev.group("arg")) if prev else None
        blocks.append(Block(rel, start + 1, m.group("lang").lower(), "\n".join(lines[start + 1:end]) + "\n", kind, arg))
        i = end + 1
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse_page(page)[0]]


BLOCKS = all_blocks()


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LORA_LITE_SHARED": SHARED,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            # `python`, `pip` and `lora-lite` in a shell block are this interpreter's
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def blocks_of(kind_langs: set[str]) -> list[Block]:
    return [b for b in BLOCKS if b.lang in kind_langs]


# ------------------------------------------------------------------------------------------------ the marks


def test_the_pages_parse_and_every_mark_is_explained():
    assert len(PAGES) >= 5 and (ROOT / "README.md") in PAGES
    problems = [p for page in PAGES for p in parse_page(page)[1]]
    for b in BLOCKS:
        if b.mark not in (None, "not-run", "check-only", "module"):
            problems.append(f"{b.id}: unknown snippet mark {b.mark!r}")
        if b.mark in ("not-run", "check-only") and not (b.mark_arg or "").strip():
            problems.append(f"{b.id}: `snippet: {b.mark}` needs a reason in parentheses")
        if b.mark == "check-only" and b.lang not in SHELL_LANGS:
            problems.append(f"{b.id}: check-only is for shell blocks, this one is {b.lang!r}")
        if b.mark == "module" and (b.lang != "python" or not (b.mark_arg or "").endswith(".py")):
            problems.append(f"{b.id}: `snippet: module PATH.py` marks a python block")
        if b.lang == "json":  # data, not code: nothing to run, but it must be valid
            try:
                json.loads(b.code)
            except ValueError as e:
                problems.append(f"{b.id}: json block does not parse: {e}")
        if b.lang not in PYTHON_LANGS | SHELL_LANGS | TEXT_LANGS | {"json"}:
            problems.append(f"{b.id}: fence language {b.lang!r} has no handler in this test")
    assert not problems, "\n".join(problems)
    not_run = [f"{b.id} ({b.mark_arg})" for b in BLOCKS if b.mark == "not-run"]
    assert len(not_run) <= MAX_NOT_RUN, f"too many blocks nobody runs: {not_run}"


# ------------------------------------------------------------------------------------------------ python


@functools.cache
def run_page(file: str, workdir: Path) -> dict[str, dict]:
    """Run every runnable python block of one page in one subprocess; {block id: its result}."""
    page = [b for b in BLOCKS if b.file == file and b.lang in PYTHON_LANGS and b.mark != "not-run"]
    blocks = workdir / "blocks.json"
    blocks.write_text(json.dumps([{"file": b.file, "line": b.line, "code": b.code,
                                   "module": b.mark_arg if b.mark == "module" else None} for b in page]))
    results = workdir / "results.json"
    proc = subprocess.run([sys.executable, str(TESTS / "snippet_runner.py"), str(blocks), str(results)],
                          cwd=workdir, env=env(), capture_output=True, text=True, timeout=600)
    done = {r["where"]: r for r in json.loads(results.read_text())} if results.exists() else {}
    for b in page:  # a crash of the interpreter itself (segfault, OOM) leaves blocks without a record
        done.setdefault(b.id, {"ok": False, "error": f"no result (exit {proc.returncode}): {proc.stderr[-3000:]}"})
    return done


@pytest.fixture(scope="module")
def page_dirs(tmp_path_factory):
    return functools.cache(lambda file: tmp_path_factory.mktemp(re.sub(r"\W", "_", file)))


def python_result(block: Block, page_dirs) -> dict:
    result = run_page(block.file, page_dirs(block.file))[block.id]
    assert result["ok"], f"{block.id} failed:\n{result.get('error')}\nstdout:\n{result.get('stdout', '')[-2000:]}"
    return result


RUNNABLE_PYTHON = [b for b in blocks_of(PYTHON_LANGS) if b.mark != "not-run"]


@pytest.mark.parametrize("block", RUNNABLE_PYTHON, ids=[b.id for b in RUNNABLE_PYTHON])
def test_python_block_runs(block, page_dirs):
    if "stories260k_dir()" in block.code:  # the suite's rule for ../shared: skip on a user's clone, fail under CI
        require_asset(stories260k_dir() / "model.safetensors")
    python_result(block, page_dirs)


def readme_block(needle: str) -> Block:
    return next(b for b in RUNNABLE_PYTHON if b.file == "README.md" and needle in b.code)


def test_readme_quickstart_trains_and_reloads_exactly(page_dirs):
    """The quickstart's own claims, from its printed output: the loss drops, the reloaded model is identical."""
    out = python_result(readme_block("ll.load(fresh"), page_dirs)["stdout"]
    assert "reloaded outputs equal: True" in out, out
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0], out
    assert (page_dirs("README.md") / "adapter.safetensors").is_file()


def test_readme_several_adapters_section_leaves_the_named_adapters(page_dirs):
    out = python_result(readme_block("ll.per_row"), page_dirs)["stdout"]
    assert "adapters: ['math', 'math_07']" in out, out


def test_readme_deploy_section_merged_model_equals_the_imported_peft_export(page_dirs):
    out = python_result(readme_block("ll.import_peft"), page_dirs)["stdout"]
    assert "merged = imported: True" in out, out


# ------------------------------------------------------------------------------------------------ shell


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: comments dropped, continuation lines joined, split at && ; |."""
    text = re.sub(r"\\\n", " ", code)
    commands = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in ("&&", ";", "|", "||", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def repo_paths(argv: list[str]) -> list[str]:
    """Arguments that name a file in the repository: a relative path whose first component exists here.
    Outputs (`--output-dir outputs/bench/x`, `out/peft`) start with a folder the repository does not have."""
    found = []
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if value.startswith("-") or "/" not in value or "://" in value or value.startswith(("/", "~")):
            continue
        first = value.split("/", 1)[0]
        if first not in (".", "..") and (ROOT / first).exists():
            found.append(value)
    return found


def check_pip(args: list[str]) -> list[str]:
    """pip install: every requirement parses; a local project's extras exist; a torch pin is the one CI uses."""
    from packaging.requirements import Requirement

    problems = []
    if args[:1] != ["install"]:
        return [f"pip {args[:1]}: only `pip install` is checked"]
    # the extras' names, from pyproject.toml's [project.optional-dependencies] table (tomllib is 3.11+ only)
    table = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", (ROOT / "pyproject.toml").read_text(),
                      flags=re.S | re.M).group(1)
    extras = set(re.findall(r"^([\w-]+)\s*=", table, flags=re.M))
    ci_pin = re.search(r"torch==[\w.+]+", (ROOT / ".ci" / "run").read_text()).group(0)
    for arg in args[1:]:
        if arg.startswith("-"):
            if arg not in ("-e", "--editable", "-q", "-U", "--upgrade"):
                problems.append(f"pip option {arg} is not one this check knows")
            continue
        local = re.fullmatch(r"(?P<path>\.{1,2}(?:/[^\[]*)?)(?:\[(?P<extras>[\w,-]+)\])?", arg)
        if local:
            if not (ROOT / local.group("path") / "pyproject.toml").exists():
                problems.append(f"{arg}: no pyproject.toml there")
            for extra in filter(None, (local.group("extras") or "").split(",")):
                if extra not in extras:
                    problems.append(f"{arg}: extra {extra!r} is not in pyproject.toml")
            continue
        req = Requirement(arg)  # raises on a malformed requirement
        if req.name == "torch" and str(req.specifier) and f"torch{req.specifier}" != ci_pin:
            problems.append(f"{arg} differs from .ci/run's {ci_pin}")
    return problems


def argparse_checked(argv: list[str]) -> bool:
    """Commands checked by their program's own argparse (the rest are venv, source, pip and pytest)."""
    prog, rest = argv[0], argv[1:]
    if prog in (".", "source", "pip", "pytest"):
        return False
    return not (prog in ("python", "python3") and rest[:2] in (["-m", "venv"], ["-m", "pip"], ["-m", "pytest"]))


@functools.cache
def tracked_files() -> frozenset[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return frozenset(out.splitlines())


def check_command(argv: list[str], created: set[str]) -> list[str]:
    """Problems with one documented command, found without running it."""
    prog, rest = argv[0], argv[1:]
    problems = [f"{p} does not exist" for p in repo_paths(argv) if not (ROOT / p).exists()]
    if prog in (".", "source"):
        path = rest[0]
        # tracked files only: a checkout's own .venv (CI makes one in the repository root) proves nothing
        if not (path in tracked_files() or any(path.startswith(c.rstrip("/") + "/") for c in created)):
            problems.append(f"{path}: sourced but neither in the repository nor created earlier in the block")
        return problems
    if prog in ("python", "python3") and rest[:2] == ["-m", "venv"]:
        created.add(rest[2])
        return problems
    if prog == "pip" or (prog in ("python", "python3") and rest[:2] == ["-m", "pip"]):
        return problems + check_pip(rest if prog == "pip" else rest[2:])
    if prog == "pytest" or (prog in ("python", "python3") and rest[:2] == ["-m", "pytest"]):
        # collecting the selection checks pytest's options and that the named tests exist, without running them
        args = rest if prog == "pytest" else rest[2:]
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        # exit 5 is "nothing collected": fine only for a -k selection of a variant the page is about to add
        if not (proc.returncode == 0 or (proc.returncode == 5 and "-k" in args)):
            problems.append(f"pytest {args} does not collect (exit {proc.returncode}): {proc.stdout[-1500:]}"
                            f"{proc.stderr[-1500:]}")
        return problems
    ok, detail = argparse_verdict(argv)
    if not ok:
        problems.append(f"arguments refused: {detail}")
    return problems


VERDICTS: dict[tuple[str, ...], tuple[bool, str]] = {}  # argv -> (accepted, detail), filled by run_argcheck


def argparse_verdict(argv: list[str]) -> tuple[bool, str]:
    """(accepted, detail) for one command. The first call checks every check-only block's commands in one process
    (torch is imported once instead of once per command)."""
    if tuple(argv) not in VERDICTS:
        pending = [c for b in CHECK_ONLY for c in shell_commands(b.code) if argparse_checked(c)] + [argv]
        run_argcheck([c for c in pending if tuple(c) not in VERDICTS])
    return VERDICTS[tuple(argv)]


def run_argcheck(commands: list[list[str]]) -> dict[tuple[str, ...], tuple[bool, str]]:
    proc = subprocess.run([sys.executable, str(TESTS / "snippet_argcheck.py"), json.dumps(commands)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)
    verdicts = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            verdicts[tuple(row["argv"])] = (row["ok"], row["detail"])
    VERDICTS.update(verdicts)
    assert len(verdicts) == len({tuple(c) for c in commands}), f"snippet_argcheck.py gave no verdict for some (exit {proc.returncode}): {proc.stderr[-3000:]}"
    return verdicts


def installs(argv: list[str]) -> bool:
    prog, rest = Path(argv[0]).name, argv[1:]
    module = rest[1] if prog.startswith("python") and rest[:1] == ["-m"] and len(rest) > 1 else None
    return prog in ("pip", "pip3", "run", "uv", "conda") or module in ("pip", "venv", "ensurepip")


def run_group(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run cmd in its own process group and, on a timeout, kill the whole group: subprocess.run's timeout kills
    only bash, and what bash started would go on running."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{shlex.join(cmd)} ran over {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


CHECK_ONLY = [b for b in blocks_of(SHELL_LANGS) if b.mark == "check-only"]
RUN_SHELL = [b for b in blocks_of(SHELL_LANGS) if b.mark is None]


@pytest.mark.parametrize("block", CHECK_ONLY, ids=[b.id for b in CHECK_ONLY])
def test_check_only_shell_block_is_accepted(block):
    commands, created = shell_commands(block.code), set()
    assert commands, f"{block.id}: no command in the block"
    problems = [f"`{shlex.join(c)}`: {p}" for c in commands for p in check_command(c, created)]
    assert not problems, f"{block.id}:\n" + "\n".join(problems)


@pytest.mark.parametrize("block", RUN_SHELL, ids=[b.id for b in RUN_SHELL])
def test_shell_block_runs(block, tmp_path):
    # A block that installs or builds an environment would change the interpreter this suite runs in: such a
    # block must be check-only, and this refuses it before anything runs.
    for argv in shell_commands(block.code):
        assert not installs(argv), f"{block.id}: `{shlex.join(argv)}` installs packages; mark the block check-only"
    # Repository paths in the block are relative to the root, as a reader in a clone types them; the tmp dir gets
    # links to the top-level entries so that outputs land in tmp_path, never in the checkout.
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv"):
            (tmp_path / entry.name).symlink_to(entry)
    proc = run_group(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------------ links


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lowercase, markup and punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {github_anchor(h) for h in re.findall(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image outside code that is not a URL."""
    found, in_fence = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                found.append((n, target))
    return found


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for page in PAGES:
        for line, target in relative_links(page):
            checked += 1
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}:{line}: {target}"
            if not dest.exists():
                broken.append(f"{where} -> {dest} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} -> no heading with anchor #{anchor} in {dest.name}")
    assert checked >= 20, f"only {checked} relative links found: is the link pattern still matching?"
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------------------------------------------ the checkers


def test_the_checkers_fail_on_broken_snippets(tmp_path):
    """Each check above can fail: a renamed flag, a missing extra or file, a failing block, a stray mark."""
    created: set[str] = set()
    bad_flags = [["lora-lite", "bench", "--no-such-flag"],
                 ["torchrun", "--nproc_per_node", "2", "-m", "lora_lite.cli", "bench", "--lorr", "1"],
                 ["accelerate", "launch", "examples/train_distributed.py", "--no-such-flag"]]
    good = ["lora-lite", "bench", "--variants", "lora", "--seeds", "0", "1"]
    no_script = ["torchrun", "--nproc_per_node", "2", "examples/no_such_script.py"]
    run_argcheck([*bad_flags, good, no_script])  # one process for all of them
    # the script behind a launcher is checked, not only the launcher
    assert all(check_command(c, created) for c in bad_flags) and not check_command(good, created)
    assert any("does not exist" in p for p in check_command(no_script, created))
    assert check_command(["pip", "install", "-e", ".[no-such-extra]"], created)
    assert check_command(["pip", "install", "torch==1.0"], created)  # not the pin .ci/run installs
    assert check_command([".", ".venv/bin/activate"], set())  # no venv made earlier in the block
    assert installs(["pip", "install", "x"]) and installs(["python3", "-m", "venv", ".v"]) and installs([".ci/run"])

    blocks = [{"file": "page.md", "line": 3, "code": "x = 1\n", "module": None},
              {"file": "page.md", "line": 9, "code": "raise ValueError(x)\n", "module": None},
              {"file": "page.md", "line": 15, "code": "print(x)\n", "module": None}]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    subprocess.run([sys.executable, str(TESTS / "snippet_runner.py"), "blocks.json", "results.json"], cwd=tmp_path,
                   check=True, capture_output=True)
    ok = [r["ok"] for r in json.loads((tmp_path / "results.json").read_text())]
    errors = [r.get("error", "") for r in json.loads((tmp_path / "results.json").read_text())]
    assert ok == [True, False, False] and 'page.md", line 10' in errors[1] and "not reached" in errors[2]

    page = tmp_path / "page.md"
    page.write_text("<!-- snippet: not-run -->\n\ntext\n```python\nx = 1\n")
    assert len(parse_page_at(page)[1]) == 2  # the mark is not right before a fence; the fence never closes
    assert github_anchor("Building a config (`LoRAConfig(...)`, `AdapterConfig.from_dict`)") == \
        "building-a-config-loraconfig-adapterconfigfrom_dict"
