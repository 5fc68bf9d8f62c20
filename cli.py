"""What the faces (demo.py, plot.py, benchmark.py) share: the command line, checked first.

python-fire calls the function with what it could parse and only then complains about the rest,
and passes "true" or "yes" on as strings. check_flags() reads the command line before any work
and before the slow imports, with the flags the fire function's signature declares: an unknown,
repeated or valueless flag, or a stray word, ends the face at once with one line "error: ..."
and exit status 2; the usual spellings of booleans become True or False. quiet_interrupt() ends
a face interrupted by Ctrl-C during its start-up with status 130, without a traceback.

Imports nothing heavy: plot.py never imports torch, and a mistyped flag is refused in a blink.
"""

import difflib
import inspect
import os
import re
import sys
from contextlib import contextmanager

BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
HELP = ("-h", "--help")


def fail(message):
    """End the face with one line "error: message" on stderr and exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def parse_boolean(value):
    """True or False from a boolean or one of its usual spellings (true/false, yes/no, 1/0, in
    any case); None for anything else."""
    if isinstance(value, bool):
        return value
    return BOOLEAN_WORDS.get(str(value).strip().lower())


def is_flag(token):
    """What fire takes for a flag: --name, or -name (a negative number is a value)."""
    return token.startswith("--") or re.match("-[a-zA-Z]", token) is not None


def check_flags(function, argv, booleans=()):
    """Check argv against function's flags; return (argv for fire, names of the flags given).

    `booleans` names the boolean flags: "--name", "--noname" and "--name WORD" with any usual
    spelling become "--name=True" or "--name=False"; another word is left for the function to
    refuse. Every other flag needs a value. Words that are not flags or values are accepted only
    when the function takes *args (plot.py's runs). "--help" (or -h) goes to fire unchecked.
    Any mistake ends the face (fail).
    """
    face = os.path.basename(sys.argv[0] or "the command")
    end = argv.index("--") if "--" in argv else len(argv)  # fire's own flags follow "--"
    if any(token in HELP for token in argv[:end]):
        return list(argv), set()
    parameters = inspect.signature(function).parameters.values()
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_words = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    checked, given = [], set()
    index = 0
    while index < end:
        token = argv[index]
        index += 1
        if not is_flag(token):
            if not takes_words:
                fail(f"unexpected argument {token!r}: flags are written --name value; see "
                     f"python {face} --help")
            checked.append(token)
            continue
        name, has_value, value = token.lstrip("-").partition("=")
        name = _full_name(name.replace("-", "_"), names)
        negated = name not in names and name.startswith("no") and name[2:] in booleans
        if negated:
            name = name[2:]
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            fail(f"unknown flag {token.partition('=')[0]}{hint}; see python {face} --help")
        if name in given:
            fail(f"--{name} is given twice")
        given.add(name)
        if negated:
            if has_value:
                fail(f"{token.partition('=')[0]} takes no value: write --{name} False")
            checked.append(f"--{name}=False")
            continue
        if not has_value and index < end and not is_flag(argv[index]):
            has_value, value = True, argv[index]
            index += 1
        if name in booleans:
            spelled = parse_boolean(value) if has_value else True
            # A word that is not a boolean is left for the function to refuse in its own words.
            checked.append(f"--{name}={value if spelled is None else spelled}")
        elif has_value:
            checked.append(f"--{name}={value}")
        else:
            fail(f"--{name} needs a value; see python {face} --help")
    return checked + list(argv[end:]), given


def _full_name(name, names):
    """A one-letter flag stands, as in fire, for the one flag that starts with that letter."""
    if len(name) != 1:
        return name
    matches = [n for n in names if n.startswith(name)]
    return matches[0] if len(matches) == 1 else name


@contextmanager
def quiet_interrupt():
    """Ctrl-C (KeyboardInterrupt) inside ends the face with one line and exit status 130 (the
    status of a process ended by SIGINT), without a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
