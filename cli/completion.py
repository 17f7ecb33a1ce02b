"""bash completion for `iscsimple` and `iscsimple-agent`, generated from their argparse parsers
(the package build runs `python3 -m iscsimple.cli.completion iscsimple|iscsimple-agent`), so a
new option or subcommand completes without anyone writing it twice."""

from __future__ import annotations

import argparse
import shlex
import sys


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if a.help != argparse.SUPPRESS)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def bash_completion(command: str, parser: argparse.ArgumentParser) -> str:
    function = "_" + command.replace("-", "_")
    subcommands = _subcommands(parser)
    lines = [
        f"# bash completion for {command}, generated from its argparse parser",
        f"{function}() {{",
        "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} sub= w",
        # Options that take a path complete files; the word after them is not a subcommand.
        "    case $prev in",
        "        --path.*|--tab|--config|--state|--records|--locks|--textfile|--web.config.file|--dest|--prefix)",
        '            COMPREPLY=($(compgen -f -- "$cur")); return;;',
        "    esac",
    ]
    if subcommands:
        lines += [
            '    for w in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do',
            "        case $w in",
            f"            {'|'.join(sorted(subcommands))}) sub=$w; break;;",
            "        esac",
            "    done",
            "    case $sub in",
        ]
        for name, sub in sorted(subcommands.items()):
            words = shlex.quote(" ".join(_options(sub)))
            lines.append(f'        {name}) COMPREPLY=($(compgen -W {words} -- "$cur"))')
            lines.append('            [[ $cur == -* ]] || COMPREPLY+=($(compgen -f -- "$cur"));;')
        top = shlex.quote(" ".join(sorted(subcommands) + _options(parser)))
        lines.append(f'        *) COMPREPLY=($(compgen -W {top} -- "$cur"));;')
        lines.append("    esac")
    else:
        words = shlex.quote(" ".join(_options(parser)))
        lines.append(f'    COMPREPLY=($(compgen -W {words} -- "$cur"))')
    lines += ["}", f"complete -F {function} {command}", ""]
    return "\n".join(lines)


def parser_for(command: str) -> argparse.ArgumentParser:
    if command == "iscsimple":
        from .main import build_parser
    elif command == "iscsimple-agent":
        from iscsimple.exporter.agent import build_parser
    else:
        raise SystemExit(f"no completion for {command!r}; use iscsimple or iscsimple-agent")
    return build_parser()


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) == 2 else "iscsimple"
    sys.stdout.write(bash_completion(command, parser_for(command)))
