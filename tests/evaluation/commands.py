"""What the command tests share: quick arguments and a stream that is a terminal."""

from __future__ import annotations

import io

#: Three epochs of MAP training and no progress bar: the commands at test size.
QUICK = ["--epochs", "3", "--quiet"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True
