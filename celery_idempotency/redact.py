"""Passwords out of every message that may show a store URL: the one place that hides them.

Used for the errors `store.connect` raises, the settings check, worker logs and the CLI. It
works on text, not on parsed URLs, because the URLs that end up in messages are exactly the
malformed ones a URL parser rejects (a bad port, a bad IPv6 address, a missing ``://``, a
password with an unencoded ``/`` or ``@``). The rules, safest first:

- in anything shaped like ``[scheme://][user]:password@host``, everything between the first
  ``:`` of the user part and the *last* ``@`` is masked (a password may itself hold ``@``, ``/``
  or ``:``); a lone ``word@host`` is masked whole, since some people put the password there;
- query parameters whose name says password, secret or token are masked;
- given the URL, its password is also masked wherever else it appears in the text (decoded,
  percent-encoded, or escaped as ``repr`` shows it), e.g. quoted back by a library's error.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

MASK = "***"
_MIN_SECRET = 3  # shorter known secrets are not searched for in free text (they would mangle it)
_SECRET_PARAM = re.compile(
    r"(?i)(\b[\w.\-]*(?:password|passwd|pwd|secret|token)[\w.\-]*=)([^&#\s'\"]*)")
_TOKEN = re.compile(r"\S+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:/*")
_QUOTES = "'\"([<{"


def _userinfo(token: str) -> tuple[int, int] | None:
    """Where the credentials of a URL-like token start and end (at its last ``@``)."""
    at = token.rfind("@")
    if at < 0:
        return None
    start = len(token) - len(token.lstrip(_QUOTES))
    authority = token.find("://", start)
    if 0 <= authority < at:
        start = authority + 3
    elif (scheme := _SCHEME.match(token, start)) and scheme.end() <= at:
        # "redis:/:pw@host", "redis:pw@host": a scheme-like word with the slashes gone wrong.
        start = scheme.end()
    return (start, at) if token[start:at] else None


def _mask_userinfo(token: str) -> str:
    span = _userinfo(token)
    if span is None:
        return token
    start, at = span
    user, colon, _password = token[start:at].partition(":")
    if not colon:  # "word@host": a username alone, or a password put where the user goes
        return token[:start] + MASK + token[at:]
    return token[:start] + user + ":" + MASK + token[at:]


def _forms(secret: str) -> set[str]:
    """The ways a password shows up in text: as given, decoded, percent-encoded, as repr."""
    decoded = unquote(secret)
    return {form for form in (secret, decoded, quote(decoded, safe=""), repr(decoded)[1:-1])
            if len(form) >= _MIN_SECRET}


def secrets_of(url: str) -> set[str]:
    """Every password-like part of a store URL, in every form it may be quoted in."""
    found: set[str] = set()
    span = _userinfo(url)
    if span is not None:
        user, colon, password = url[span[0]:span[1]].partition(":")
        found |= _forms(password if colon else user)
    for match in _SECRET_PARAM.finditer(url):
        found |= _forms(match.group(2))
    return found


def redact(text: str, url: str | None = None) -> str:
    """``text`` with every password hidden; ``url``: the store URL the text may quote."""
    masked = text
    if url:
        # Known secrets first (the rules below would cut one up and leave parts of it);
        # longest first: a short form may be part of a longer one.
        for secret in sorted(secrets_of(url), key=len, reverse=True):
            masked = masked.replace(secret, MASK)
    masked = _TOKEN.sub(lambda match: _mask_userinfo(match.group(0)), masked)
    return _SECRET_PARAM.sub(lambda match: match.group(1) + MASK, masked)


def redact_url(url: str) -> str:
    """A store URL fit for a message or a log line."""
    return redact(url, url)
