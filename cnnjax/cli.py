"""What every ``python -m cnnjax.X`` entry point shares: preset names for ``--config`` and
one-line errors instead of tracebacks for mistakes a user can fix."""

import os
import sys

from absl import app, logging

from cnnjax import configs
from cnnjax.errors import CnnjaxError


def resolve_config_arg(argv: list[str]) -> list[str]:
    """Rewrites ``--config=NAME`` (a preset name) to the preset's file path for config_flags."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            arg = "--config=" + configs.resolve(arg.split("=", 1)[1])
        out.append(arg)
    return out


def run(main, argv: list[str] | None = None) -> None:
    """``absl.app.run(main)`` where a ``CnnjaxError`` exits with status 2 and a one-line
    ``error: ...`` on stderr."""

    def guarded(args):
        # Library chatter (Orbax, TensorFlow) stays out of the user's terminal unless asked for.
        logging.set_verbosity(logging.WARNING)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            return main(args)
        except CnnjaxError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    try:
        argv = resolve_config_arg(sys.argv if argv is None else argv)
    except CnnjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(guarded, argv=argv)
