"""Target regexes, bounded before they are compiled.

Config patterns (`target_names`, `exclude_names`) may come from a downloaded file, and attach runs them with
`re.search` on every module name. Python's backtracking matcher has no step limit, so a pattern is parsed and
refused (ConfigError) when its worst case is not small:
  - it does not parse: a syntax error, a repetition count too large, nesting too deep for the parser;
  - a repeat holds another variable-width repeat or an alternation: `(a+)+`, `(.*)*`, `(a|ab)+`. These take
    time exponential in the name's length on a name that almost matches (catastrophic backtracking);
  - it has more than MAX_VARIABLE_REPEATS variable-width repeats (`*`, `+`, `?`, `{m,n}`): k of them in
    sequence cost up to len(name)^(k+1) steps per name (`.*.*.*.*.*X` takes a third of a second on one
    60-character name, and each further one multiplies that by the name's length);
  - it has a backreference (`\\1`): matching with backreferences has no polynomial bound at all, and module
    names never need one.
Everything a target pattern needs (literals, classes, anchors, alternation, a few repeats, lookarounds) passes.
"""

from __future__ import annotations

import re

try:  # the parser re.compile uses; public as sre_parse up to 3.10, re._parser since 3.11
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

from .errors import ConfigError

MAX_VARIABLE_REPEATS = 3
# Literal characters, '.' and escaped punctuation, optionally anchored at both ends (what re.escape and plain
# dotted module names give): always valid, no repeat or group, so matched in linear time. Checked without the
# parser, which costs ~100x more: import_peft writes one such pattern per layer, and a file may hold 100k.
# The pattern is linear itself: its three alternatives start with different characters.
_LITERALISH = re.compile(r"\^?(?:[^\\.^$*+?{}\[\]()|]|\\[^A-Za-z0-9]|\.)*\$?")


def _ops(*names: str) -> set:
    """The parser's opcodes of these names that this Python has (possessive repeats and atomic groups: 3.11+)."""
    return {getattr(_sre, n) for n in names if hasattr(_sre, n)}


_REPEATS = _ops("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
_BACKREFS = _ops("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE")
_ATOMIC = _ops("ATOMIC_GROUP")


def check_pattern(field_name: str, pattern: str) -> None:
    """Refuse `pattern` (ConfigError naming `field_name`) unless it compiles and its worst case is small."""
    if _LITERALISH.fullmatch(pattern):
        return
    found = _problem(pattern)
    if found is not None:
        shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
        raise ConfigError(f"{field_name} entry {shown!r} {found[0]}; {found[1]}")


def _problem(pattern: str) -> tuple[str, str] | None:
    """(what is wrong, how to fix it), or None for a pattern that compiles and matches in bounded time."""
    try:
        tree = _sre.parse(pattern)
        re.compile(pattern)
    except re.error as e:
        return (f"is not a valid regular expression ({e})",
                "fix the pattern (escape literal dots and brackets with a backslash)")
    except (OverflowError, RecursionError) as e:
        return f"cannot be compiled ({type(e).__name__}: {e})", "use small repetition counts and shallow groups"
    stats = {"variable": 0}
    try:
        found = _walk(tree, inside_repeat=False, stats=stats)
    except RecursionError:
        return "is nested too deeply to check", "use shallow groups"
    if found is None and stats["variable"] > MAX_VARIABLE_REPEATS:
        found = (f"has {stats['variable']} variable-width repeats (*, +, ?, {{m,n}}); more than "
                 f"{MAX_VARIABLE_REPEATS} can take polynomial time of high degree on long module names",
                 "anchor on literal parts of the name instead (re.search needs no leading or trailing .*)")
    return found


def _walk(items, *, inside_repeat: bool, stats: dict) -> tuple[str, str] | None:
    for op, av in items:
        found = None
        if op in _BACKREFS:
            return ("uses a backreference, which can take exponential time",
                    "match the module name without backreferences")
        if op in _REPEATS:
            low, high, body = av
            if high != low:
                stats["variable"] += 1
                if inside_repeat:
                    return ("nests a variable-width repeat inside another repeat, which can take exponential time "
                            "on a name that almost matches (catastrophic backtracking)",
                            "repeat the inner part once, e.g. (a+) instead of (a+)+")
            found = _walk(body, inside_repeat=inside_repeat or high > 1, stats=stats)
        elif op is _sre.BRANCH:
            if inside_repeat:
                return ("repeats an alternation, which can take exponential time when its branches overlap",
                        "write the alternation once, without a repeat around it")
            for branch in av[1]:
                found = found or _walk(branch, inside_repeat=inside_repeat, stats=stats)
        elif op is _sre.SUBPATTERN:
            found = _walk(av[3], inside_repeat=inside_repeat, stats=stats)
        elif op in _ATOMIC:
            found = _walk(av, inside_repeat=inside_repeat, stats=stats)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            found = _walk(av[1], inside_repeat=inside_repeat, stats=stats)
        if found is not None:
            return found
    return None
