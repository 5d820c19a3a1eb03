"""`python -m musev_lite` / `musev-lite`: one entry point for the commands.

    musev-lite run CONFIG.toml [--set section.key=value ...] [--print-config]
    musev-lite import-tasks MUSEV_TASKS.yaml [--root DIR] > tasks.toml
    musev-lite fetch MODEL [--dest DIR ...]
    musev-lite convert {musev,sd15,controlnet,ip_adapter,faceid} ...
    musev-lite --version

Each command is a module (`python -m musev_lite.run`, `.fetch`, `.tasks` for import-tasks, `.convert.musev`,
`.convert.sd15`, `.convert.controlnet`, `.convert.ip_adapter`, `.convert.faceid`), called with the remaining
arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = {"run": "musev_lite.run", "fetch": "musev_lite.fetch", "import-tasks": "musev_lite.tasks"}
CONVERTERS = {"musev": "musev_lite.convert.musev", "sd15": "musev_lite.convert.sd15",
              "controlnet": "musev_lite.convert.controlnet", "ip_adapter": "musev_lite.convert.ip_adapter",
              "faceid": "musev_lite.convert.faceid"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="musev-lite", description="MuseV video generation in plain PyTorch.",
        epilog="`musev-lite COMMAND --help` describes a command's options.")
    parser.add_argument("--version", action="version", version=f"musev_lite {__version__}")
    parser.add_argument("command", choices=[*COMMANDS, "convert"],
                        help="run: make a video (or one per [[task]]) from a TOML configuration; fetch: download "
                             "and convert a released model; convert: convert checkpoints you have (musev, sd15, "
                             "controlnet, ip_adapter or faceid); import-tasks: MuseV's task YAML as [[task]] tables")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    args = parser.parse_args(argv)
    module, rest, prog = COMMANDS.get(args.command), args.args, f"musev-lite {args.command}"
    if args.command == "convert":
        if not rest or rest[0] not in CONVERTERS:
            parser.error(f"convert needs a converter first: one of {', '.join(CONVERTERS)} "
                         "(e.g. musev-lite convert musev --help)")
        module, rest, prog = CONVERTERS[rest[0]], rest[1:], f"{prog} {rest[0]}"
    try:
        command = importlib.import_module(module)  # seconds (torch): Ctrl-C here is one line, not a traceback
    except KeyboardInterrupt:
        print("interrupted while starting: nothing was written", file=sys.stderr)
        return 130
    return command.main(rest, prog=prog)  # its --help names it as called here


if __name__ == "__main__":
    sys.exit(main())
