"""What the scripts share: config and run arguments, and turning user mistakes into one line."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable, NoReturn, Optional, Sequence

from pylon import PylonError


def add_config_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--config", required=required,
                        help="a YAML file, or a bare name looked up in configs/ (e.g. pylon_r50.yaml)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                        help="override config values, e.g. --set train.epochs=5 data.image_size=512")


def add_run_args(parser: argparse.ArgumentParser) -> None:  # the run evaluate.py and predict.py work on
    parser.add_argument("--run", metavar="RUN_DIR", help="the run folder (default: the most recent run in --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", help="where runs live when --run is not given (default: runs)")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM (kill, a scheduler's stop) ends a script as Ctrl-C does


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> NoReturn:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)  # train.py says itself how to resume, when there is a checkpoint
        code = 130
    except (PylonError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)
