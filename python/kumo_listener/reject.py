"""The exception that turns into an SMTP reply."""

from __future__ import annotations


class Reject(Exception):
    """Raised in any ``smtp_server_*`` event, becomes that SMTP reply.

    ``message`` may start with an enhanced status code (``"5.7.1 go away"``);
    otherwise a generic one for the reply class is added. A 421 also closes
    the connection.
    """

    def __init__(self, code: int, message: str) -> None:
        if not isinstance(code, int) or not 400 <= code <= 599:
            raise ValueError(f"Reject code must be a 4xx or 5xx reply code, got {code!r}")
        super().__init__(code, message)
        self.code = code
        self.message = str(message)

    def __str__(self) -> str:
        return f"{self.code} {self.message}"
