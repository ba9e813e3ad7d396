"""Run one markdown page's python blocks in order, in this one process, and write what each block did.

    python snippet_runner.py blocks.json results.json

blocks.json: [{"file": ..., "line": ..., "code": ..., "module": null or "src/pkg/mod.py"}, ...]. The blocks share one
namespace, as a reader typing them into one session would: a later block may use names an earlier one defined.
Each block is compiled under its markdown file's name, padded so that traceback line numbers are the page's. A
block marked `module PATH` is the content of that file, and is imported under PATH's dotted name (its relative
imports need the package). The first failing block stops the page: later ones are recorded as not reached,
because they may depend on it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
import time
import traceback
from pathlib import Path


class _Tee(io.TextIOBase):
    """Keep a block's stdout for the test's assertions and still show it in the subprocess's own output."""

    def __init__(self, stream):
        self.stream, self.buffer_text = stream, io.StringIO()

    def write(self, s):
        self.buffer_text.write(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def import_as_module(block: dict) -> None:
    rel = Path(block["module"])
    parts = rel.with_suffix("").parts
    dotted = ".".join(parts[1:] if parts[0] == "src" else parts)
    path = Path.cwd() / "_snippet_modules" / rel.name
    path.parent.mkdir(exist_ok=True)
    path.write_text(block["code"])
    spec = importlib.util.spec_from_file_location(dotted, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[dotted] = module
    spec.loader.exec_module(module)


def main(blocks_path: str, results_path: str) -> int:
    blocks = json.loads(Path(blocks_path).read_text())
    namespace = {"__name__": "__main__"}
    results, failed_at = [], None
    for block in blocks:
        where = f"{block['file']}:{block['line']}"
        if failed_at is not None:
            results.append({"where": where, "ok": False, "error": f"not reached: the block at {failed_at} failed"})
            continue
        tee, start = _Tee(sys.stdout), time.perf_counter()
        print(f"--- {where}", flush=True)
        try:
            with contextlib.redirect_stdout(tee):
                if block["module"]:
                    import_as_module(block)
                else:
                    # line numbers in tracebacks are the markdown file's: the code starts after the fence line
                    code = compile("\n" * block["line"] + block["code"], block["file"], "exec")
                    exec(code, namespace)
            results.append({"where": where, "ok": True, "stdout": tee.buffer_text.getvalue(),
                            "seconds": time.perf_counter() - start})
        except BaseException:  # noqa: B036 - a snippet's SystemExit or KeyboardInterrupt is its failure too
            failed_at = where
            results.append({"where": where, "ok": False, "stdout": tee.buffer_text.getvalue(),
                            "error": traceback.format_exc(limit=-8)})
        Path(results_path).write_text(json.dumps(results))  # after every block: a crash still leaves a record
    Path(results_path).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
