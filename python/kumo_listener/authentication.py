"""Message authentication on demand, for policy with rules of its own
(KumoMTA's ``policy-extras.mail_auth.check``): the checks of the
``authentication`` parameter, run by the same engine and resolver
(docs/operations/authentication.md)."""

from __future__ import annotations

import asyncio
import functools
from typing import Unpack, cast

from . import _core
from .types import AuthenticationChecks, AuthenticationResult


def check_authentication(
    message: _core.Message,
    conn_meta: _core.ConnectionMeta,
    *,
    spf: bool = True,
    dkim: bool = True,
    dmarc: bool = True,
    arc: bool = True,
    iprev: bool = True,
    add_header: bool = False,
) -> list[AuthenticationResult]:
    """Check ``message`` from the client of ``conn_meta``: SPF of its MAIL
    FROM identity (the null sender: ``postmaster@<helo>``), iprev, DKIM
    (one result per signature, at most 10 checked), ARC and DMARC, those
    asked, whatever the ``authentication`` parameter says. Returns the
    results in ``message.authentication_results``' shape, in that order.
    With ``add_header``, their ``Authentication-Results:`` field (our
    ``hostname`` as authserv-id) goes at the top of the message.

    Blocks until done (the GIL released): for ``def`` handlers. From an
    ``async def`` handler, await :func:`check_authentication_async`.
    Raises ``ValueError`` when ``conn_meta`` has no client IP address.
    """
    results = _core.check_authentication(
        message, conn_meta, spf, dkim, dmarc, arc, iprev, add_header
    )
    return cast(list[AuthenticationResult], results)


async def check_authentication_async(
    message: _core.Message,
    conn_meta: _core.ConnectionMeta,
    **checks: Unpack[AuthenticationChecks],
) -> list[AuthenticationResult]:
    """:func:`check_authentication` for ``async def`` handlers, with its
    options: the wait is on a thread of the event loop's default executor,
    not the loop."""
    check = functools.partial(check_authentication, message, conn_meta, **checks)
    return await asyncio.get_running_loop().run_in_executor(None, check)
