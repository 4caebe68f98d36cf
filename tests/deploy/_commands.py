"""Find the `splitserve ...` command lines in deploy/ and parse them with the real CLI parser.

Three sources: shell text (Dockerfile, README code blocks, YAML comments, `bash -c` strings),
Kubernetes containers (`command` + `args` lists) and Helm templates, whose `args` lists
are evaluated here just far enough to be parsed (see `template_args`): no Helm needed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from splitserve.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "splitserve"

PLACEHOLDER = "DEPLOY_TIME_VALUE"  # a value known only at deploy time ($(POD_IP), an include)
_SHELL_STOP = {";", "&&", "||", "|", "&", ">", ">>", "<", ">&", "2>", "(", ")", "`"}
_IMAGE = re.compile(r"([\w.-]+/)*splitserve:[\w.-]+")  # the image, whose entrypoint is splitserve
_SUBST = re.compile(r"\$\([^)]*\)|{{.*?}}")  # $(POD_IP), {{ .Values.x }}: one opaque word


PARSER = build_parser()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in PARSER._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("splitserve's parser has no subcommands")


SUBCOMMANDS = _subcommands()


def shell_invocations(text: str) -> list[list[str]]:
    """argv lists (after `splitserve`) of every splitserve command in shell-like text;
    backslash continuations are joined, quoted strings holding commands are searched too."""
    found: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip().lstrip("#").strip()
        if "splitserve" not in line:
            continue
        found.extend(_invocations_in(_SUBST.sub(PLACEHOLDER, line)))
    return found


def _invocations_in(line: str) -> Iterator[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: prose, not a command
        return
    for i, token in enumerate(tokens):
        program = token == "splitserve" or _IMAGE.fullmatch(token)  # or `docker run IMAGE`
        if program and i + 1 < len(tokens) and tokens[i + 1] in SUBCOMMANDS:
            argv = []
            for tok in tokens[i + 1:]:
                if tok in _SHELL_STOP:
                    break
                argv.append(tok)
            yield argv
        elif "splitserve " in token:  # e.g. ray exec CLUSTER "splitserve serve ..."
            yield from _invocations_in(token)


def container_invocations(doc: Any) -> Iterator[tuple[str, list[str]]]:
    """(container name, argv after `splitserve`) for each container of a parsed manifest
    that runs splitserve directly, or through `bash -c "... splitserve ..."`."""
    for container in _containers(doc):
        argv = [str(a) for a in [*container.get("command", []), *container.get("args", [])]]
        if argv and argv[0] == "splitserve":
            yield container["name"], [_SUBST.sub(PLACEHOLDER, a) for a in argv[1:]]
        else:
            for found in shell_invocations("\n".join(argv)):
                yield container["name"], found


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _find_action(command: str, flag: str) -> argparse.Action | None:
    for parser in (PARSER, SUBCOMMANDS.get(command)):
        if parser is not None and flag in parser._option_string_actions:
            return parser._option_string_actions[flag]
    return None


def fill_placeholders(argv: list[str]) -> list[str]:
    """Give each deploy-time placeholder a value of the type its flag takes."""
    command = next((a for a in argv if a in SUBCOMMANDS), "")
    out: list[str] = []
    for i, token in enumerate(argv):
        action = _find_action(command, argv[i - 1]) if i else None
        if PLACEHOLDER in token and action is not None:
            if action.choices:
                token = str(next(iter(action.choices)))
            elif action.type in (int, float):
                token = "1"
        out.append(token)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse with `splitserve.cli.build_parser()`; AssertionError (with argparse's message)
    on an unknown flag, a bad value, an abbreviated flag or a missing required flag."""
    argv = fill_placeholders(argv)
    command = next((a for a in argv if a in SUBCOMMANDS), "")
    for token in argv:
        if token.startswith("--") and "=" not in token:
            assert _find_action(command, token) is not None, f"{token} is not a flag of {command}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return PARSER.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"splitserve {' '.join(argv)}\n{err.getvalue()}") from None


# --- Helm templates -------------------------------------------------------------------

_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)
_BLOCKS = ("if ", "with ", "range ")


def helm_defines(text: str) -> dict[str, list[str]]:
    """The bodies (as lines) of `{{ define "name" }}` blocks, nesting-aware."""
    defines: dict[str, list[str]] = {}
    name: str | None = None
    body: list[str] = []  # the lines of the define being read
    depth = 0
    for line in text.splitlines():
        for action in _ACTION.findall(line):
            if action.startswith("define "):
                if depth == 0:
                    name, body = action.split('"')[1], []
                depth += 1
            elif action.startswith(_BLOCKS) and name:
                depth += 1
            elif action == "end" and name:
                depth -= 1
                if depth == 0:
                    defines[name] = body[1:]  # body[0] is the define line itself
                    name = None
        if name:
            body.append(line)
    return defines


def template_args(text: str, defines: Mapping[str, list[str]],
                  values: Mapping[str, Any]) -> list[list[str]]:
    """argv (after `splitserve`) of each `command: ["splitserve"]` container in a template.

    Evaluated just enough to parse: `.Values.x` / `$root.Values.x` from `values`; `.role`,
    `$cfg.x`, `.serveKvStore` from the `(dict "role" ... "cfg" .Values.R ...)` argument of
    the template's include; the `quote` / `int` pipes. Anything else (an include's output,
    `.` inside `with`) becomes PLACEHOLDER. `if` / `with` bodies are kept unless their
    condition evaluates false; `range` bodies (user-supplied extraArgs) are dropped.
    """
    scope = _Scope(values, _dict_argument(text, values))
    lines = _expand(text.splitlines(), defines)
    return [_args_after(lines, i + 1, scope) for i, line in enumerate(lines)
            if line.strip() == 'command: ["splitserve"]']


class _Scope:
    def __init__(self, values: Mapping[str, Any], bindings: dict[str, Any]):
        self.values, self.bindings = values, bindings

    def resolve(self, expr: str) -> Any:
        """The value of a simple expression, or PLACEHOLDER when not evaluable here."""
        if re.fullmatch(r"(\$root|\$)?\.Values(\.\w+)+", expr):
            return lookup(self.values, expr.split(".Values.", 1)[1])
        if re.fullmatch(r"\$cfg(\.\w+)+", expr) and "cfg" in self.bindings:
            return lookup(self.bindings["cfg"], expr.split(".", 1)[1])
        if re.fullmatch(r"\.\w+", expr) and expr[1:] in self.bindings:
            return self.bindings[expr[1:]]
        return PLACEHOLDER

    def condition(self, action: str) -> bool:
        """Whether the body of `if X` / `if not X` / `with X` is rendered (True if unknown)."""
        expr = action.split(" ", 1)[1].strip()
        negate = expr.startswith("not ")
        value = self.resolve(expr.removeprefix("not ").strip())
        if value == PLACEHOLDER:
            return True
        return bool(value) != negate


def _dict_argument(text: str, values: Mapping[str, Any]) -> dict[str, Any]:
    match = re.search(r'include "[\w.]+" \(dict (.*)\) \|', text)
    if match is None:
        return {}
    bindings: dict[str, Any] = {}
    for key, raw in re.findall(r'"(\w+)" ("[^"]*"|true|false|\.Values(?:\.\w+)+)', match.group(1)):
        if raw.startswith('"'):
            bindings[key] = raw.strip('"')
        elif raw in ("true", "false"):
            bindings[key] = raw == "true"
        else:
            bindings[key] = lookup(values, raw.split(".Values.", 1)[1])
    return bindings


def _expand(lines: list[str], defines: Mapping[str, list[str]]) -> list[str]:
    out: list[str] = []
    for line in lines:
        match = re.fullmatch(r'\s*{{-?\s*include "([\w.]+)".*}}\s*', line)
        if match and match.group(1) in defines:
            out.extend(_expand(defines[match.group(1)], defines))
        else:
            out.append(line)
    return out


def _args_after(lines: list[str], start: int, scope: _Scope) -> list[str]:
    assert lines[start].strip() == "args:", f"expected args: after the command, got {lines[start]!r}"
    argv: list[str] = []
    stack: list[bool] = []  # per open block: are its lines rendered?
    for line in lines[start + 1:]:
        stripped = line.strip()
        control = _ACTION.fullmatch(stripped)
        if control:
            action = control.group(1)
            if action.startswith(("if ", "with ")):
                stack.append(scope.condition(action))
            elif action.startswith("range "):
                stack.append(False)
            elif action == "end":
                stack.pop()
            continue
        if not stripped.startswith("- "):
            break  # the container's next key: the list is over
        if all(stack):
            argv.append(_evaluate(stripped[2:], scope))
    return argv


def _evaluate(item: str, scope: _Scope) -> str:
    match = _ACTION.fullmatch(item)
    if match is None:
        return str(yaml.safe_load(item))
    expr, *pipes = [part.strip() for part in match.group(1).split("|")]
    value = scope.resolve(expr)
    if value is None or value == PLACEHOLDER:
        return PLACEHOLDER
    for pipe in pipes:
        assert pipe in ("quote", "int"), f"unsupported pipe {pipe!r} in {item!r}"
        value = int(value) if pipe == "int" else value
    return str(value)


def lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """tree["a"]["b"] for "a.b"; KeyError naming the missing path."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return node
