"""README.md and docs/*.md as a user reads them: every Python and shell block runs as written.

A block preceded by ``<!-- not run: REASON -->`` (a GPU, the hub, an hour of CPU) is not run;
its commands' flags are still checked against the scripts' own parsers. Blocks run in a scratch
folder that links the checkout's files, so their ``runs/`` outputs stay out of the checkout.
The configuration reference and the launch flags table are checked against the code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from typing import NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")
MODULES = {"ds_chunk.bench": "ds_chunk.bench.cli", "ds_chunk.bench.quality": "ds_chunk.bench.quality",
           "ds_chunk.plan": "ds_chunk.plan.cli", "ds-chunk-plan": "ds_chunk.plan.cli"}  # fmt: skip


class Block(NamedTuple):
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason, or None: the block runs

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a page."""
    lines = open(os.path.join(ROOT, page)).read().split("\n")
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            end = lines.index("```", i + 1)
            marker = NOT_RUN.fullmatch(lines[i - 1].strip()) if i else None
            code = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Block(page, i + 1, lines[i][3:].strip(), code, marker and marker.group(1)))
            i = end
        i += 1
    return found


CODE = [b for page in PAGES for b in blocks(page) if b.lang in ("python", "bash")]


def commands(code: str) -> list[list[str]]:
    """Each shell command of a bash block as argv (continuations joined, comments and `...` dropped)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        argv: list[str] = []
        for token in [*shlex.split(line, comments=True), "&&"]:
            if token == "&&" and argv:
                out.append(argv)
                argv = []
            elif token not in ("&&", "..."):
                argv.append(token)
    return out


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> str:
    """A folder holding links to the checkout's files: blocks run there as in the checkout."""
    path = str(tmp_path_factory.mktemp("docs"))
    for name in os.listdir(ROOT):
        if name not in ("runs", "bench_out", ".git"):
            os.symlink(os.path.join(ROOT, name), os.path.join(path, name))
    return path


@pytest.mark.parametrize("block", [b for b in CODE if b.not_run is None], ids=lambda b: b.id)
def test_block_runs_as_written(block: Block, scratch: str):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    if block.lang == "python":
        script = os.path.join(scratch, f"block_{block.page.replace('/', '_')}_{block.line}.py")
        with open(script, "w") as f:
            f.write(block.code)
        cmd = [sys.executable, script]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


class _Parsed(Exception):
    pass


def _parse_only(argv: list[str]) -> argparse.Namespace | None:
    """Parse argv as the script or module it runs would: its ``parse_args(argv)`` where it has one
    (the checks after parsing included), else its parser inside ``main``; None for commands not ours."""
    if argv[0] == "python" and argv[1] == "-m":
        if argv[2] not in MODULES:
            return None  # pip, pytest
        module, args = importlib.import_module(MODULES[argv[2]]), argv[3:]
    elif argv[0] in MODULES:
        module, args = importlib.import_module(MODULES[argv[0]]), argv[1:]
    else:
        scripts = [i for i, t in enumerate(argv) if t.endswith(".py")]
        if not scripts:
            return None
        path, args = os.path.join(ROOT, argv[scripts[0]]), argv[scripts[0] + 1 :]
        if "def main(" not in open(path).read():  # a script without flags (the minimal example)
            assert not args, f"{argv}: {path} takes no arguments"
            return None
        sys.path.insert(0, os.path.dirname(path))
        spec = importlib.util.spec_from_file_location(f"doc_{os.path.basename(path)[:-3]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if hasattr(module, "parse_args"):
        return module.parse_args(args)
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse
    try:
        module.main(args)
    except _Parsed as parsed:
        return parsed.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{argv}: main() returned without parsing its arguments")


@pytest.mark.parametrize("block", [b for b in CODE if b.lang == "bash"], ids=lambda b: b.id)
def test_commands_parse(block: Block, capsys):
    """Every command's flags exist and take the values given, as the script checks them (run or not)."""
    for argv in commands(block.code):
        with contextlib.redirect_stderr(sys.stdout):
            try:
                _parse_only(argv)
            except SystemExit as e:
                raise AssertionError(f"{block.id}: {shlex.join(argv)}\n{capsys.readouterr().out[-1500:]}") from e


def test_not_run_markers_are_for_shell_commands_only():
    """A marker sits right above a block, and only shell blocks have one: every Python example runs."""
    for page in PAGES:
        text = open(os.path.join(ROOT, page)).read()
        for m in NOT_RUN.finditer(text):
            assert text[m.end() :].startswith("\n```bash"), f"{page}: '{m.group(0)}' is not above a bash block"


def test_a_block_not_run_because_another_page_runs_it_is_there():
    """``<!-- not run: PAGE runs the same command -->``: every command of the block is in a block of
    PAGE that runs."""
    for block in (b for b in CODE if b.not_run and b.not_run.endswith("runs the same command")):
        page = block.not_run.split()[0]
        ran = [c for b in CODE if b.page == page and b.not_run is None for c in commands(b.code)]
        assert all(c in ran for c in commands(block.code)), f"{block.id}: not run in {page} as written"


def _table_keys(page: str, header: str) -> set[str]:
    text = open(os.path.join(ROOT, page)).read()
    table = re.match(r"((?:\|.*\n)+)", text[text.index(header) :]).group(1).splitlines()[2:]
    return {key for row in table for key in re.findall(r"`([a-z_.]+)`", row.split("|")[1])}


def test_configuration_reference_lists_every_key():
    from ds_chunk.config import ChunkwiseConfig, SparseConfig

    keys = {f.name for f in dataclasses.fields(ChunkwiseConfig)} - {"sparse"}
    keys |= {f"sparse.{f.name}" for f in dataclasses.fields(SparseConfig)}
    assert _table_keys("docs/configuration.md", "| key | default | meaning |") == keys


def test_launch_page_names_every_flag():
    spec = importlib.util.spec_from_file_location("doc_train", os.path.join(ROOT, "launch", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with pytest.raises(_Parsed):
        original = argparse.ArgumentParser.parse_args
        parsers = []

        def keep(self, args=None, namespace=None):
            parsers.append(self)
            raise _Parsed

        argparse.ArgumentParser.parse_args = keep
        try:
            train.parse_args([])
        finally:
            argparse.ArgumentParser.parse_args = original
    flags = {s for a in parsers[0]._actions for s in a.option_strings if s.startswith("--")}
    hidden = {"--help", "--local_rank", "--local-rank"}  # the launchers' own
    text = open(os.path.join(ROOT, "docs", "launch.md")).read()
    missing = sorted(f for f in flags - hidden if not re.search(re.escape(f) + r"(?![\w-])", text))
    assert not missing, f"docs/launch.md does not mention {missing}"
    table = text[text.index("| flag |") :].split("\n\n")[0]
    stale = sorted(f for f in re.findall(r"`(--[a-z][\w-]*)", table) if f not in flags)
    assert not stale, f"docs/launch.md's flags table names flags train.py does not have: {stale}"


FIGURE = re.compile(r"\**[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?\**(?: \(.*\))?")  # a cell that is a number


def test_measured_tables_name_their_command():
    """A table of figures (three or more cells that are numbers) has a command near it, in a shell
    block or inline: above it, or in the lines right below. Which command made which table is for
    the reader to see; this catches a table quoted with none."""
    for page in PAGES:
        text = open(os.path.join(ROOT, page)).read()
        for m in re.finditer(r"^\|.*\n\|[-:| ]+\|\n(?:\|.*\n?)*", text, re.M):
            cells = [c.strip() for row in m.group(0).splitlines()[2:] for c in row.strip("|").split("|")]
            if sum(bool(FIGURE.fullmatch(c)) for c in cells) < 3:
                continue
            around = text[max(0, m.start() - 2500) : m.end() + 1000]  # above it, or right below
            named = "```bash" in around or re.search(r"`(python |ds-chunk-plan|tests/)", around)
            line = text[: m.start()].count("\n") + 1
            assert named, f"{page}:{line}: a table of figures without the command that produced them"


def _anchors(page: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, page)).read(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_resolve():
    """Every relative link names a file of the checkout, and its #anchor a heading of that page."""
    for page in PAGES:
        text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, page)).read(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if link.startswith(("http://", "https://")):
                continue
            path, _, anchor = link.partition("#")
            target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(os.path.join(ROOT, target)), f"{page}: {link}: no such file"
            if anchor:
                assert anchor in _anchors(target), f"{page}: {link}: no such heading in {target}"
