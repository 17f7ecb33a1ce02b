"""`iscsimple`: the operator CLI.

    iscsimple status [--json]
    iscsimple check-config [--tab F] [--config F] [DOMU.cfg ...]
    iscsimple attach SPEC / detach SPEC
    iscsimple convert-config DOMU.cfg ... [--write]
    iscsimple install-hook [--prefix DIR] [--dest FILE] [--force] [--mdadm-names]
    iscsimple bitmap-store
    iscsimple resolve LABEL --keep local|iscsi          (cli/resolve.py)
    iscsimple migrate-check DOMAIN|LABEL                (cli/migrate.py)
    iscsimple accept-loss lunN@TARGET --host HOST ...   (cli/migrate.py)

Exit codes: 0 ok, 1 an operation failed, 2 bad input (arguments, spec, tab, config).
Errors are one sentence on stderr, never a traceback (--debug shows one).

Each subcommand is a module-level `add_<name>(subparsers)` that registers its parser
and sets `run`; SUBCOMMANDS lists them in help order. A larger subcommand (like
`resolve`) lives in its own module with the same shape and is added to SUBCOMMANDS as a
`Lazy` (that module is imported only when the command line may run it); nothing else
here needs to change.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from iscsimple import __version__
from iscsimple.core.config import Config, load_config
from iscsimple.core.errors import InputError, IscsimpleError, one_line

from .options import Parser, common_options, host_paths

log = logging.getLogger("iscsimple")


# --- subcommands ----------------------------------------------------------------------------------


def add_status(sub) -> None:
    p = sub.add_parser("status", help="attached disks: legs, sync, iSCSI sessions, replacement timeouts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run_status)


def run_status(args: argparse.Namespace) -> int:
    from iscsimple.core.snapshot import HostSnapshot

    from .status import build_status, render_json, render_table

    paths = host_paths(args)
    # A broken config must not hide the state of the host (it is what an outage needs first).
    config_error = None
    try:
        config = load_config(paths.config)
    except InputError as e:
        config, config_error = Config(), e
    status = build_status(HostSnapshot.read(paths), config)
    sys.stdout.write(render_json(status) if args.json else render_table(status))
    for error in status.errors:
        print(f"iscsimple status: could not read {error}", file=sys.stderr)
    if config_error is not None:
        print(
            f"iscsimple status: {config_error} (configured timeouts shown are the defaults)", file=sys.stderr
        )
        return config_error.exit_code
    return 1 if status.errors else 0


def add_check_config(sub) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate the tab file, iscsimple.toml and the disk entries of domU .cfg files",
        description="Reports every error as FILE:LINE: message and exits 2 if there is any.",
    )
    p.add_argument("cfgs", nargs="*", type=Path, metavar="DOMU.cfg", help="xl domain config files to check")
    p.set_defaults(run=run_check_config)


def run_check_config(args: argparse.Namespace) -> int:
    from .checkconfig import check_all

    paths = host_paths(args)
    report = check_all(paths, args.cfgs, tab_given=getattr(args, "tab", None) is not None)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in report.errors:
        print(error, file=sys.stderr)
    if report.errors:
        print(f"check-config: {len(report.errors)} error(s); fix them and run it again", file=sys.stderr)
        return 2
    print(f"check-config: ok ({report.summary})")
    return 0


def add_attach(sub) -> None:
    p = sub.add_parser("attach", help="attach SPEC outside Xen (log in, build the mirror); prints the device")
    p.add_argument("spec", metavar="SPEC", help="[lunN@]TARGET[+LABEL]")
    p.set_defaults(run=run_attach)


def run_attach(args: argparse.Namespace) -> int:
    from iscsimple.core.spec import parse_spec
    from iscsimple.hotplug.attach import attach

    spec = parse_spec(args.spec)
    paths = host_paths(args)
    attachment = attach(spec, paths, load_config(paths.config))
    print(attachment.device_path)
    return 0


def add_detach(sub) -> None:
    p = sub.add_parser("detach", help="undo 'iscsimple attach SPEC' (stop the mirror, log out when unused)")
    p.add_argument("spec", metavar="SPEC", help="the SPEC given to attach")
    p.set_defaults(run=run_detach)


def run_detach(args: argparse.Namespace) -> int:
    from iscsimple.core.spec import parse_spec
    from iscsimple.hotplug.attach import cli_attachment_id
    from iscsimple.hotplug.detach import detach

    spec = parse_spec(args.spec)
    paths = host_paths(args)
    detached = detach(cli_attachment_id(spec), paths, load_config(paths.config))
    if detached is None:
        print(
            f"iscsimple detach: {spec} was not attached with 'iscsimple attach'; nothing to do",
            file=sys.stderr,
        )
    else:
        print(detached.device_path or detached.md_path or spec)
    return 0


def add_convert_config(sub) -> None:
    p = sub.add_parser(
        "convert-config",
        help="rewrite legacy 'iscsimple:' disk entries of domU .cfg files to script=block-iscsimple,target=",
        description="Shows a unified diff; --write edits the files in place, keeping FILE.bak.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="DOMU.cfg")
    p.add_argument("--write", action="store_true", help="edit the files in place (a backup FILE.bak is kept)")
    p.set_defaults(run=run_convert_config)


def run_convert_config(args: argparse.Namespace) -> int:
    from .convert import convert_file, write_conversion

    conversions, errors = [], []
    for path in args.files:
        conversion, file_errors = convert_file(path)
        errors += file_errors
        if conversion is not None:
            conversions.append(conversion)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print(
            f"convert-config: {len(errors)} error(s), nothing written; fix the entries and run it again",
            file=sys.stderr,
        )
        return 2
    for conversion in conversions:
        if not conversion.changed:
            print(f"{conversion.path}: no legacy iscsimple: entries, nothing to convert", file=sys.stderr)
            continue
        sys.stdout.write(conversion.diff())
        if args.write:
            backup = write_conversion(conversion)
            print(
                f"{conversion.path}: converted {len(conversion.rewrites)} entries (backup {backup})",
                file=sys.stderr,
            )
    if not args.write and any(c.changed for c in conversions):
        print("convert-config: nothing written; add --write to apply", file=sys.stderr)
    return 0


def add_install_hook(sub) -> None:
    p = sub.add_parser(
        "install-hook",
        help="install /etc/xen/scripts/block-iscsimple (a launcher of this installation) and an example tab",
        description="Write /etc/xen/scripts/block-iscsimple, the launcher xl runs, naming this installation's "
        "block-iscsimple by absolute path, and example tab and config files where there are none. Where the "
        "Debian package is installed the hook is its conffile: install-hook only checks it (exit 0 when it is "
        "the package's launcher, an error saying how to restore it otherwise) and never rewrites it.",
    )
    p.add_argument("--prefix", type=Path, default=Path("/"), help="install under this root (default /)")
    p.add_argument(
        "--dest", type=Path, help="the launcher's path (default PREFIX/etc/xen/scripts/block-iscsimple)"
    )
    p.add_argument("--force", action="store_true", help="replace a DEST that is not an iscsimple launcher")
    p.add_argument(
        "--mdadm-names",
        action="store_true",
        help="also write /etc/mdadm/mdadm.conf.d/iscsimple.conf (CREATE names=yes), needed beyond 512 arrays; "
        "host-wide: every array mdadm creates by name becomes md_NAME",
    )
    p.set_defaults(run=run_install_hook)


def run_install_hook(args: argparse.Namespace) -> int:
    from .install import install_hook

    paths = host_paths(args)
    tab = getattr(args, "tab", None)
    result = install_hook(
        prefix=args.prefix,
        dest=args.dest,
        tab=tab,
        config=getattr(args, "config", None),
        force=args.force,
        default_tab=paths.tab,
        mdadm_names=args.mdadm_names,
    )
    for line in result.report():
        print(line)
    return 0


def add_bitmap_store(sub) -> None:
    p = sub.add_parser(
        "bitmap-store",
        help="put the mirrors' write-intent bitmap files in RAM now (ext4 on a zram device at RECORDS/bitmaps)",
        description="Make the RAM store for write-intent bitmap files: a zram device with ext4, mounted at "
        "the records directory's bitmaps/. The first mirror build of a boot makes it when it is not there; "
        "the Debian package runs this at boot (iscsimple-bitmap-store.service) so that no attach pays for it. "
        "Exit 0 when the directory is a mount point (the RAM store, or a filesystem mounted there already), "
        "1 when the RAM store cannot be made: the files then stay on the records directory's filesystem, "
        "and md writes them to disk before each write to a clean chunk.",
    )
    p.set_defaults(run=run_bitmap_store)


# modprobe, mkfs.ext4 and mount, each bounded by core.bitmapstore.COMMAND_TIMEOUT
BITMAP_STORE_SECONDS = 60.0


def run_bitmap_store(args: argparse.Namespace) -> int:
    from iscsimple.core import bitmapstore
    from iscsimple.core.run import Deadline

    store = bitmapstore.ensure(host_paths(args), Deadline(BITMAP_STORE_SECONDS), retry=True)
    print(f"{store.directory}: {store.description}")
    return 0 if store.mounted else 1


@dataclass(frozen=True)
class Lazy:
    """`add_<name>` of a subcommand whose module imports much (resolve: the heal and attach
    engines). The module is imported only when the command line may run one of `commands`:
    it names one, names no subcommand at all, or asks for --help. Every other start of the
    CLI skips those imports (seconds each on an emulated CPU, where the real-kernel tests run)."""

    module: str
    function: str
    commands: tuple[str, ...]

    def __call__(self, sub) -> None:
        getattr(importlib.import_module(self.module, __package__), self.function)(sub)

    def needed(self, argv: Sequence[str] | None, known: set[str]) -> bool:
        if argv is None or "-h" in argv or "--help" in argv:
            return True
        named = known.intersection(argv)
        return not named or bool(named.intersection(self.commands))


SUBCOMMANDS: tuple[Callable, ...] = (
    add_status,
    add_check_config,
    add_attach,
    add_detach,
    add_convert_config,
    add_install_hook,
    add_bitmap_store,
    Lazy(".resolve", "add_resolve", ("resolve",)),  # iscsimple resolve LABEL --keep local|iscsi
    Lazy(".migrate", "add_migrate_check", ("migrate-check",)),
    Lazy(".migrate", "add_accept_loss", ("accept-loss",)),
)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line, without the Lazy subcommands it cannot run."""
    common = common_options()
    parser = Parser(
        prog="iscsimple",
        description="Operate iscsimple disks: iSCSI LUNs for Xen VMs, mirrored onto local devices.",
        epilog="Exit status: 0 done, 1 an operation failed on the host, 2 bad input. "
        "'iscsimple COMMAND --help' for a command's options.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"iscsimple {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    original_add = sub.add_parser

    def add_parser(name, **kwargs):
        # `iscsimple COMMAND --help` (and its man page section) starts with what the command does.
        kwargs.setdefault("description", _sentence(kwargs.get("help", "")))
        return original_add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser
    lazy_names = {name for add in SUBCOMMANDS if isinstance(add, Lazy) for name in add.commands}
    for add in SUBCOMMANDS:
        if isinstance(add, Lazy) and not add.needed(argv, set(sub.choices) | lazy_names):
            continue
        add(sub)
    return parser


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "." if text else text


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown option is reported by the subcommand's parser (its --help, and
    the option it probably meant), not by the top-level one."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = _subparsers(parser)[args.command]
        known = [o for action in command._actions for o in action.option_strings]
        guesses = difflib.get_close_matches(extras[0], known, n=1)
        hint = f" (did you mean {guesses[0]}?)" if guesses and extras[0].startswith("-") else ""
        command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    debug = False
    command = "iscsimple"
    try:
        if argv is None:
            argv = sys.argv[1:]
        args = parse_args(build_parser(argv), argv)
        debug = getattr(args, "debug", False)
        command = f"iscsimple {args.command}"
        _setup_logging(debug)
        return args.run(args)
    except IscsimpleError as e:
        _fail(command, str(e), debug)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # `iscsimple status | head`: not an error
        return 0
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        _fail(command, f"cannot access{where}: {e.strerror or e}; check the path (and run as root)", debug)
        return 1
    except Exception as e:  # a bug: still one line, the traceback with --debug
        _fail(command, f"internal error ({type(e).__name__}: {e}); rerun with --debug and report it", debug)
        return 1


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    if not debug:
        # A failure reaches the operator once, as the exception's sentence; the engine's own
        # error log line would repeat it. Warnings (things that went wrong but not fatally) stay.
        handler.addFilter(lambda record: record.levelno < logging.ERROR)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "iscsimple_cli", False)]:
        root.removeHandler(old)  # main() may run more than once in a process (tests)
    handler.iscsimple_cli = True
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def _fail(command: str, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"{command}: {one_line(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
