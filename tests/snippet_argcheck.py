"""Check that a documented command's arguments are accepted, without running the command.

    python snippet_argcheck.py '[["lora-lite", "bench", "--full"], ...]'

Launchers are unwrapped with their own parsers (torchrun: torch.distributed.run's, `accelerate launch`:
accelerate's), `lora-lite` is the module lora_lite.cli, and `python [-m] X` is X. The program is then started
for real, but the first `argparse.ArgumentParser.parse_args` call ends it. So a documented flag that was renamed
or removed fails, and nothing long runs. All commands are checked in this one process (torch is imported once);
one JSON line per command on stdout: {"argv": [...], "ok": true|false, "detail": "..."}, where detail is the
parsed namespace or argparse's own error message.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import sys


class Accepted(SystemExit):
    pass


def target(argv: list[str]) -> tuple[str, bool, list[str]]:
    """(script path or module name, is_module, its arguments) that the command line runs."""
    prog, rest = argv[0], argv[1:]
    if prog == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(rest)
        return ns.training_script, bool(ns.module), ns.training_script_args
    if prog == "accelerate":
        if rest[:1] != ["launch"]:
            raise ValueError(f"only `accelerate launch` is checked, not {argv}")
        from accelerate.commands.launch import launch_command_parser

        ns = launch_command_parser().parse_args(rest[1:])
        return ns.training_script, bool(ns.module), ns.training_script_args
    if prog == "lora-lite":
        return "lora_lite.cli", True, rest
    if prog in ("python", "python3"):
        if rest[:1] == ["-m"]:
            return rest[1], True, rest[2:]
        return rest[0], False, rest[1:]
    raise ValueError(f"do not know how to check the arguments of {prog!r}")


def check(argv: list[str]) -> tuple[bool, str]:
    original = argparse.ArgumentParser.parse_args
    try:  # the launcher's own parse, before the patch below: it is the program behind it that must stop
        script, is_module, args = target(argv)
    except SystemExit as e:
        return False, f"the launcher refused its arguments (exit {e.code})"
    except ValueError as e:
        return False, str(e)

    def parse_then_stop(self, args=None, namespace=None):
        ns = original(self, args, namespace)  # a bad argument exits 2 here, with argparse's message on stderr
        raise Accepted(f"{self.prog}: {vars(ns)}")

    argparse.ArgumentParser.parse_args = parse_then_stop
    saved_argv, err = sys.argv, io.StringIO()
    try:
        sys.argv = [script, *args]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if is_module:
                runpy.run_module(script, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
    except Accepted as done:
        return True, str(done.code)
    except SystemExit as e:
        return False, f"exit {e.code}: {err.getvalue().strip()[-1500:]}"
    except Exception as e:  # an import error or a crash before parsing: the command would fail the same way
        return False, f"{type(e).__name__}: {e}"
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    return False, "finished without calling ArgumentParser.parse_args: its arguments were not checked"


def main(commands: list[list[str]]) -> None:
    for argv in commands:
        ok, detail = check(argv)
        print(json.dumps({"argv": argv, "ok": ok, "detail": detail}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
