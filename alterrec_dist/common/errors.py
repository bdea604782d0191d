"""The two kinds of bad input every command reports as one line on stderr (`cli.run_cli`), exit code 2, and the
rules for what such a line may show."""
import re


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


# user:secret@ after a scheme, where the part before the first / holds a : or an @. Hidden up to the last @ of the
# word: a raw / or @ inside a secret (AWS secret keys hold /) would otherwise leave its tail shown. A URL with a
# port and an @ in its path (http://host:5000/a@b) is hidden too: a line says less, never a secret.
_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://)(?=[^/\s]*[:@])\S*@", re.IGNORECASE)


def hide_credentials(text: str) -> str:
    """`text` with the credentials of every URI in it (scheme://user:secret@host) shown as scheme://***@host."""
    return _CREDENTIALS.sub(r"\1***@", text)
