"""The docs cannot rot: every `gannet ...` command line in README.md and docs/*.md (and in the
Makefile's recipes and the examples `gannet --help` prints) goes through the real argument parser,
and every `gannet train ...` line through `--dry-run` (in this process: the config loads, its keys
and values are checked, `auto` resolves), so a renamed flag, command, config or config key fails
here with the file and line.

What counts as a command line:
- in a fenced block (not python/yaml/json/toml/text): each line that runs `gannet` (`gannet ...`,
  `.venv/bin/gannet ...`, `python -m gannet ...`, `accelerate launch ... -m gannet ...`), after any
  `VAR=value` prefix; continuation lines (`\\`, or indented options under a synopsis) are joined
  and `# comments` dropped. In a block that
  uses `$ ` prompts only the prompted lines are commands; the lines after one are its output, and
  an output starting `gannet: error:` documents an error, which the command must still give
  (unless the line sets environment variables: then the error depends on them and is not replayed);
- in inline code: a span that starts with `gannet ` or holds `-m gannet `. A span that names a
  flag without the rest of a command (`gannet sample --label`) is checked as a reference.
A line with placeholders (`CONFIG`, `RUN_DIR`, `[--n 64]`, `a|b`, `...`, `key=value`) is a synopsis:
its command and every option it names must exist. A config that a page defines in a YAML block
starting `# configs/NAME.yaml` is used for that page's `gannet train NAME` (with the worked example
recipe of docs/architecture.md registered).
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from gannet.trainer.cli import EPILOG, build_parser, parse
from gannet.trainer.cli import main as cli_main
from gannet.trainer.config.loader import load_config
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIPPED_LANGUAGES = {"python", "py", "yaml", "yml", "json", "toml", "text"}
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
RUNS_GANNET = re.compile(r"^([A-Za-z_]\w*=\S*\s+)*(\S*/)?gannet(\s|$)|\s-m gannet(\s|$)")
CAPS = re.compile(r"(?<![A-Za-z])[A-Z][A-Z0-9_]*(?![a-z])")  # CONFIG, RUN_DIR, N, s3://BUCKET/PREFIX/


@dataclass
class Command:
    doc: str  # README.md, docs/x.md
    line: int
    text: str  # as written (joined)
    args: list[str]  # the words after `gannet`
    env: bool  # set environment variables before gannet
    inline: bool
    error: str = ""  # the documented `gannet: error: ...` output, if any

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def gannet_words(text: str) -> tuple[list[str], bool] | None:
    """The words after `gannet` in a shell line, and whether it sets variables first; None if the
    line does not run gannet."""
    if not RUNS_GANNET.search(text.strip()):
        return None
    try:
        words = shlex.split(text, comments=True)
    except ValueError as exc:
        raise AssertionError(f"not a valid shell line ({exc}): {text}") from None
    env = 0
    while env < len(words) and ENV.match(words[env]):
        env += 1
    words = words[env:]
    if words and (words[0] == "gannet" or words[0].endswith("/gannet")):
        return words[1:], env > 0
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "gannet":
            return words[i + 2:], env > 0
    return None


def block_commands(doc: str, start: int, lines: list[str]) -> list[Command]:
    """Commands of one fenced block whose first line is line `start` of the file."""
    prompted = any(line.startswith("$ ") for line in lines)
    found, i = [], 0
    while i < len(lines):
        number, text = start + i, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        while i < len(lines) and lines[i][:1].isspace() and lines[i].strip()[:1] in ("[", "-"):  # a synopsis' next line
            text, i = text + " " + lines[i].strip(), i + 1
        if prompted and not text.startswith("$ "):
            continue
        words = gannet_words(text.removeprefix("$ "))
        if words is None:
            continue
        output = lines[i] if prompted and i < len(lines) else ""
        error = output.removeprefix("gannet: error: ") if output.startswith("gannet: error: ") else ""
        found.append(Command(doc, number, text, words[0], words[1], inline=False, error=error))
    return found


def command_lines(path: Path) -> list[Command]:
    """Every gannet command line of a Markdown file, in fenced blocks and in inline code."""
    doc, found = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name, []
    lines = path.read_text().splitlines()
    fence, language, body = None, "", []
    for number, line in enumerate(lines, 1):
        if fence is None and line.lstrip().startswith("```"):
            fence, language, body = number, line.strip().strip("`").strip().lower(), []
        elif fence is not None and line.lstrip().startswith("```"):
            if language not in SKIPPED_LANGUAGES:
                found += block_commands(doc, fence + 1, body)
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if span.startswith("gannet ") or "-m gannet " in span:
                    words = gannet_words(span)
                    if words is not None:
                        found.append(Command(doc, number, span, words[0], words[1], inline=True))
    return found


def placeholder(word: str) -> bool:
    """A word standing for something the reader fills in."""
    return (any(mark in word for mark in ("[", "]", "|", "...", "…", "$")) or word.startswith("key=")
            or CAPS.search(word) is not None and not word.startswith("-"))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def check_reference(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """A synopsis or a fragment: each command word names a command, each option exists there."""
    path = ["gannet"]
    words = list(args)
    while words and subcommands(parser) and not words[0].startswith("-"):
        if placeholder(words[0]):
            break
        choices = subcommands(parser)
        assert words[0] in choices, f"{' '.join(path)} has no command {words[0]!r} (it has: {', '.join(choices)})"
        parser, path = choices[words[0]], [*path, words.pop(0)]
    for word in words:
        for part in word.strip("[]").split("|"):
            part = part.strip("[]")
            if part.startswith("-") and len(part) > 1 and not part[1].isdigit():
                option = part.split("=", 1)[0]
                assert option in parser._option_string_actions, f"{' '.join(path)} has no option {option}"


class ParseError(Exception):
    pass


def parse_strictly(args: list[str]) -> argparse.Namespace:
    """The CLI's own parse, with argparse's exit turned into an exception carrying its message."""
    parser, _ = build_parser()

    def error(self: argparse.ArgumentParser, message: str) -> None:
        raise ParseError(f"{self.prog}: error: {message}")

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        return parse(parser, args)
    finally:
        argparse.ArgumentParser.error = original


FRAGMENT = ("the following arguments are required", "expected one argument", "expected at least one argument")


def check_parses(command: Command) -> argparse.Namespace | None:
    """Parse a full command line; an inline span that only lacks required parts is a reference."""
    parser, _ = build_parser()
    if any(placeholder(word) for word in command.args):
        check_reference(parser, command.args)
        return None
    if {"-h", "--help", "--version"} & set(command.args):
        check_reference(parser, command.args)
        return None
    try:
        return parse_strictly(command.args)
    except ParseError as exc:
        if command.inline and any(part in str(exc) for part in FRAGMENT):
            check_reference(parser, command.args)
            return None
        raise AssertionError(f"{exc}") from None


def documented_error_matches(documented: str, actual: str) -> bool:
    """The documented error, up to its first elision or parenthesis, starts the actual one."""
    head = re.split(r"\(|\.\.\.|…", documented, maxsplit=1)[0].strip()
    return actual.removeprefix("gannet: error: ").startswith(head)


def page_configs(path: Path, folder: Path) -> dict[str, Path]:
    """Configs a page defines: YAML blocks whose first line is `# configs/NAME.yaml`, written to `folder`."""
    found = {}
    if not path.is_file():  # the examples of `gannet --help`
        return found
    for name, body in re.findall(r"```yaml\n# configs/(\w+)\.yaml\n(.*?)```", path.read_text(), flags=re.S):
        found[name] = folder / f"{name}.yaml"
        found[name].write_text(body)
    return found


def makefile_lines(path: Path) -> list[Command]:
    """The Makefile's recipe lines that run `$(BIN)/gannet` (its variables, e.g. $(CONFIG), are placeholders)."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split()
        starts = [i for i, word in enumerate(words) if word.endswith("/gannet")]
        if line.startswith("\t") and starts:
            found.append(Command(path.name, number, line.strip(), words[starts[0] + 1:], env=False, inline=False))
    return found


ALL = [command for doc in DOCS for command in command_lines(doc)] + makefile_lines(REPO / "Makefile") \
    + block_commands("gannet --help", 2, EPILOG.splitlines()[1:])  # the examples `gannet --help` prints


@pytest.mark.parametrize("command", ALL, ids=[c.id for c in ALL])
def test_docs_command_line_parses_and_trains_dry(command, tmp_path, monkeypatch, capsys, plugin_recipe):
    """A command line from the docs goes through the real parser; a `gannet train` line through --dry-run."""
    try:
        args = check_parses(command)
    except AssertionError as exc:
        pytest.fail(f"{command.id}: `{command.text}`: {exc}")
    if args is None:
        return
    configs = page_configs(REPO / command.doc, tmp_path)
    monkeypatch.chdir(tmp_path)  # a fresh machine: no runs/, no data/
    if args.command == "train" and args.config is None and command.inline:
        return  # `gannet train` named in prose
    if args.command == "train":
        run = [configs.get(args.config, args.config), *args.overrides, "--dry-run"]
        code, err = cli_main(["train", *map(str, run)]), capsys.readouterr().err.strip().splitlines()
        if command.error and not command.env:
            assert code == 2 and documented_error_matches(command.error, err[-1]), f"{command.id}: documented {command.error!r}, got {err}"
        elif not command.error:
            assert code == 0, f"{command.id}: `{command.text}` --dry-run exited {code}: {err[-1:]}"
    elif getattr(args, "config", None) and hasattr(args, "overrides") and not command.error:
        load_config(args.config, args.overrides)  # bench and slurm lines: the config and its keys


def test_the_collector_finds_commands_synopses_and_documented_errors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "Run `gannet train sngan_mnist train.steps=5` or see `gannet sample --label`; `make train` is not gannet.",
        "```bash",
        "OMP_NUM_THREADS=1 gannet bench loader sngan_mnist 's3://b/p/' \\",
        "    --steps 3   # a comment",
        "accelerate launch --config_file launch/accelerate/1gpu.yaml -m gannet train lsgan_mnist",
        "```",
        "```",
        "$ gannet train lsgan_mnist train.stepz=5",
        "gannet: error: unknown key 'train.stepz' (allowed in train: ...)",
        "gannet bench scaling   (output, not a command)",
        "```",
        "```python",
        "gannet train not_a_command_here",
        "```",
    ]))
    found = [(c.line, c.args, c.env, c.inline, c.error) for c in command_lines(page)]
    assert found == [
        (1, ["train", "sngan_mnist", "train.steps=5"], False, True, ""),
        (1, ["sample", "--label"], False, True, ""),
        (3, ["bench", "loader", "sngan_mnist", "s3://b/p/", "--steps", "3"], True, False, ""),
        (5, ["train", "lsgan_mnist"], False, False, ""),
        (8, ["train", "lsgan_mnist", "train.stepz=5"], False, False, "unknown key 'train.stepz' (allowed in train: ...)"),
    ]


@pytest.mark.parametrize("line, problem", [
    ("gannet bench --speed", "unrecognized arguments: --speed"),
    ("gannet slurm CONFIG --nodes N [--time 90]", "gannet slurm has no option --time"),
    ("gannet trian CONFIG", "gannet has no command 'trian'"),
    ("gannet bench scaling lsgan_mnist --loader-seconds 3", "unrecognized arguments: --loader-seconds 3"),
    ("`gannet sample --lable`", "gannet sample has no option --lable"),
])
def test_a_renamed_flag_or_command_is_caught(line, problem):
    inline = line.startswith("`")
    words, env = gannet_words(line.strip("`"))
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check_parses(Command("x.md", 1, line, words, env, inline=inline))


def test_the_docs_hold_commands_and_train_lines():
    """The collector is not silently empty: the README's own quick start is in it."""
    assert len(ALL) >= 20 and sum(c.args[:1] == ["train"] for c in ALL) >= 5
    assert any(c.doc == "Makefile" and c.args[:2] == ["bench", "speed"] for c in ALL)  # make bench-gpu's command
    assert sum(c.doc == "gannet --help" for c in ALL) >= 10
