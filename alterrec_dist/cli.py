"""Shared entry-point behaviour: bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable

from alterrec_dist.errors import ConfigError, DataError


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a DataError/ConfigError becomes `error: <message>` and exit code 2."""
    try:
        code = main(argv)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
