"""The two kinds of bad input every command reports as one line on stderr (`cli.run_cli`), exit code 2."""


class DataError(Exception):
    """Bad input. The message is one line that names the file (and row/column where it applies)."""


class DamagedData(DataError):
    """Data that reads, and reads the same every time, but cannot be used (a NaN text feature): unlike a read
    that failed, which another attempt may get through, a retry meets it again."""


class ConfigError(Exception):
    """A config value or override that cannot be used; the message says which and why."""


def one_line(e: Exception) -> str:
    """An exception's message folded onto one line (library errors span several)."""
    return " ".join(str(e).split())
