"""The user docs stay true to the code: every command in README.md and docs/*.md uses only
flags its script's --help lists, every link between the pages resolves, and the README's code
map names every module with about its size."""

import contextlib
import functools
import glob
import io
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, load_script

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
README_MAX_LINES = 190
SHELL_FENCES = {"bash", "sh", "shell"}
# A flag whose value is a command line of another script (scripts/protocol.py passes them on).
NESTED = {
    "scripts/protocol.py": {"--search_args": "search.py", "--augment_args": "augment.py"},
}
# Scripts whose --help is read in a subprocess: main() changes the interpreter for good
# (search_float64 makes float64 torch's default dtype and patches engine), which would leak
# into the other tests of this process.
OUT_OF_PROCESS = {"scripts/search_float64.py"}


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


# --- extracting the commands --------------------------------------------------------------
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def shell_commands(markdown):
    """The commands of the fenced bash/sh/shell blocks (continuation lines joined), then those
    of inline code spans that start with a launcher (`python search.py ...`)."""
    commands = []
    for lang, body in FENCE.findall(markdown):
        if lang.lower() in SHELL_FENCES:
            joined = re.sub(r"\\\n", " ", body)
            commands += [line.strip() for line in joined.splitlines() if line.strip()]
    prose = FENCE.sub("", markdown)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if re.match(r"(\S*/)?(python3?|torchrun)\s|docker run\s", span):
            commands.append(span)
    return commands


def _is_python(token):
    return re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(token)) is not None


def script_calls(command):
    """[(script, args)] of each python script a shell command starts: `python X.py`,
    `.venv/bin/python X.py`, `python -m torch.distributed.run ... X.py`, `torchrun ... X.py`,
    the same behind env assignments, inside `docker run ... image python X.py`, and after `;`,
    `&&`, `|` or in `( )`. The value of a NESTED flag is the command line of its own script."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    simple, current = [], []
    for tok in tokens:
        if tok and set(tok) <= set(";&|()"):
            simple.append(current)
            current = []
        else:
            current.append(tok)
    simple.append(current)
    calls = []
    for words in simple:
        launched = False
        for i, word in enumerate(words):
            if _is_python(word):
                if i + 2 < len(words) and words[i + 1] == "-m":
                    if words[i + 2] != "torch.distributed.run":
                        break  # another module (python -m pytest ...): not a script of ours
                launched = True
            elif os.path.basename(word) == "torchrun":
                launched = True
            elif launched and word.endswith(".py"):
                calls += _with_nested(word, words[i + 1 :])
                break
    return calls


def _with_nested(script, args):
    calls, own = [], []
    nested = NESTED.get(script, {})
    i = 0
    while i < len(args):
        own.append(args[i])
        flag, eq, value = args[i].partition("=")
        if flag in nested:
            if not eq and i + 1 < len(args):  # --search_args "..." : the next word
                i += 1
                value = args[i]
                own.append(value)
            calls.append((nested[flag], shlex.split(value)))
        i += 1
    return [(script, own), *calls]


def flags_used(script, args):
    """The --flags of an argument list, without their values (`--name=x` is `--name`); the value
    of a NESTED flag is not read as flags of this script."""
    nested = NESTED.get(script, {})
    used, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if re.match(r"--[A-Za-z]", arg):
            flag, eq, _ = arg.partition("=")
            used.append(flag)
            skip = flag in nested and not eq
    return used


# --- what each script accepts --------------------------------------------------------------
def flags_of_help(text):
    """The --flags argparse lists in a --help text: its option lines start with two spaces and
    a dash (descriptions are indented further)."""
    flags = set()
    for line in text.splitlines():
        m = re.match(r"^  (-[^ ].*?)(?:  |$)", line)
        if m:
            flags.update(re.findall(r"--[A-Za-z][\w-]*", m.group(1)))
    return flags


@functools.cache
def help_text(script):
    """The script's --help, in this process (its main(["--help"]) prints it and exits) unless it
    is OUT_OF_PROCESS: one import of each script per session, no interpreter per call."""
    path = os.path.join(ROOT, script)
    if script not in OUT_OF_PROCESS:
        name = "_docs_" + re.sub(r"\W", "_", script[:-3])
        module = load_script(script, name)
        if callable(getattr(module, "main", None)):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
                module.main(["--help"])
            assert stop.value.code in (0, None), f"{script} --help exited with {stop.value.code}"
            return out.getvalue()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert done.returncode == 0, f"{script} --help: {done.stderr[-500:]}"
    return done.stdout


def unknown_flags(markdown):
    """[(script, flag, command)] for each flag a command uses that its script does not list, and
    for each script that does not exist."""
    bad = []
    for command in shell_commands(markdown):
        for script, args in script_calls(command):
            if not os.path.isfile(os.path.join(ROOT, script)):
                bad.append((script, "(no such script)", command))
                continue
            known = flags_of_help(help_text(script))
            bad += [(script, f, command) for f in flags_used(script, args) if f not in known]
    return bad


# --- the tests ------------------------------------------------------------------------------
SNIPPET = """
Prose with `python search.py --epochs 2` inline, and `evaluate.py --official` (no launcher).

```bash
OMP_NUM_THREADS=1 .venv/bin/python search.py --name x --dataset digits \\
    --made_up_flag 3                      # a comment: --not_a_flag
torchrun --nproc_per_node=2 augment.py --name v2 --genotype "Genotype(normal=[[...]], ...)"
python -m torch.distributed.run --nnodes=1 search.py --layers=5
docker run --gpus all --ipc=host --rm darts python evaluate.py --checkpoint a.pth.tar --bogus
python scripts/protocol.py --name t --search_args "--epochs 2 --no_such_search_flag" \\
    --augment_args=--layers --search_args=--first_order
(cd /tmp && python scripts/benchmark.py --only weight) && cp scripts/benchmark.py /tmp/
python -m pytest tests/test_docs.py --weird
```

```
python search.py --in_a_plain_block   # not a shell block: not read
```
"""


def test_the_extractor_finds_each_launcher_and_the_nested_command_lines():
    calls = [c for cmd in shell_commands(SNIPPET) for c in script_calls(cmd)]
    assert calls == [
        ("search.py", ["--name", "x", "--dataset", "digits", "--made_up_flag", "3"]),
        ("augment.py", ["--name", "v2", "--genotype", "Genotype(normal=[[...]], ...)"]),
        ("search.py", ["--layers=5"]),
        ("evaluate.py", ["--checkpoint", "a.pth.tar", "--bogus"]),
        (
            "scripts/protocol.py",
            ["--name", "t", "--search_args", "--epochs 2 --no_such_search_flag"]
            + ["--augment_args=--layers", "--search_args=--first_order"],
        ),
        ("search.py", ["--epochs", "2", "--no_such_search_flag"]),
        ("augment.py", ["--layers"]),
        ("search.py", ["--first_order"]),
        ("scripts/benchmark.py", ["--only", "weight"]),
        ("search.py", ["--epochs", "2"]),  # the inline span
    ]
    protocol = calls[4]
    assert flags_used(*protocol) == ["--name", "--search_args", "--augment_args", "--search_args"]


def test_a_made_up_flag_in_the_docs_fails_the_check():
    bad = {(script, flag) for script, flag, _ in unknown_flags(SNIPPET)}
    assert bad == {
        ("search.py", "--made_up_flag"),
        ("evaluate.py", "--bogus"),
        ("search.py", "--no_such_search_flag"),
    }


def test_a_command_naming_a_missing_script_fails_the_check():
    bad = unknown_flags("```bash\npython scripts/no_such_script.py --name x\n```\n")
    assert [(s, f) for s, f, _ in bad] == [("scripts/no_such_script.py", "(no such script)")]


def test_every_flag_in_the_docs_is_in_its_scripts_help():
    checked, bad = set(), []
    for page in PAGES:
        text = read(page)
        checked.update(s for cmd in shell_commands(text) for s, _ in script_calls(cmd))
        bad += [f"{page}: {s} has no {f}: {' '.join(c.split())}" for s, f, c in unknown_flags(text)]
    assert not bad, "\n".join(bad)
    # the check read the commands of every stage and tool the docs show
    assert {"search.py", "augment.py", "evaluate.py", "visualize.py"} <= checked
    assert {"scripts/protocol.py", "scripts/benchmark.py", "scripts/gpu_check.py"} <= checked


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown):
    prose = FENCE.sub("", markdown)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)}


def test_every_link_between_the_pages_resolves():
    broken = []
    for page in PAGES:
        prose = FENCE.sub("", read(page))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: outside the repository
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(ROOT, file)):
                broken.append(f"{page}: {target} (no {file})")
            elif anchor and anchor not in anchors(read(file)):
                broken.append(f"{page}: {target} (no heading #{anchor} in {file})")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_docs_page():
    readme = read("README.md")
    missing = [p for p in PAGES[1:] if f"]({p})" not in readme and f"]({p}#" not in readme]
    assert not missing, missing


def code_map():
    """{path: line count or None} of the rows of the README's code map."""
    section = re.search(r"^## Code map\n(.*?)(?=^## )", read("README.md"), flags=re.M | re.S)
    assert section, "README.md lacks its ## Code map"
    rows = re.findall(r"^\| \[?`([^`]+)`\]?(?:\([^)]*\))? \| *(\d*) *\|", section.group(1), re.M)
    return {path: int(n) if n else None for path, n in rows}


def test_the_code_map_lists_every_module_with_about_its_size():
    listed = code_map()
    modules = [
        os.path.relpath(p, ROOT)
        for pattern in ("*.py", "models/*.py", "scripts/*.py")
        for p in glob.glob(os.path.join(ROOT, pattern))
        if os.path.basename(p) != "__init__.py"
    ]
    assert not set(modules) - set(listed), f"not in the code map: {set(modules) - set(listed)}"
    off = []
    for path, count in listed.items():
        if not os.path.exists(os.path.join(ROOT, path)):
            off.append(f"{path}: no such file")
        elif path.endswith(".py"):
            actual = read(path).count("\n")  # what wc -l counts
            if count is None or abs(count - actual) > 0.2 * actual:
                off.append(f"{path}: the map says {count} lines, it has {actual}")
    assert not off, "\n".join(off)


def test_the_readme_is_an_index_not_the_manual():
    assert read("README.md").count("\n") <= README_MAX_LINES
