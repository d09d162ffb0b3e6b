"""Argument handling and start-up shared by every script."""
import sys

from visualglm.errors import UserError


def run_main(main, argv=None):
    """Run main(argv); a user mistake (UserError, a missing file) is one line on stderr and exit code 2."""
    try:
        return main(argv)
    except (UserError, FileNotFoundError) as err:
        message = str(err) if isinstance(err, UserError) else f"file not found: {err.filename or err}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def str2bool(value):
    """argparse type for true/false flags written as words (the MindFormers scripts' convention)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")
