"""Store-originated text made safe for a terminal, and for JSON read by one.

Keys, scopes, task ids, task names, owners and error messages come from whoever publishes
tasks (or from anything that writes under the key prefix). Printed raw, an escape sequence in
one would act on the operator's terminal: ``ESC ] 0;title BEL`` (OSC) retitles it, ``ESC [2J``
clears it, U+202E (RIGHT-TO-LEFT OVERRIDE) shows text reversed. click strips colour codes
(CSI) from piped output but lets OSC and 8-bit C1 controls through, so escaping is the CLI's
job, piped or not.

- `shown` escapes a value for human output: every character that is not printable (C0 and
  C1 controls, ESC, DEL, bidi overrides and isolates, zero-width and other format characters,
  line breaks, lone surrogates) becomes ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``, and ``\\``
  becomes ``\\\\``, so that what is shown maps back to exactly one value.
- `safe_text` is the last line of defence for a whole message: the same escapes, but line
  breaks and backslashes are kept (its values went through `shown` already).
- `json_safe` keeps JSON output exact (``json.loads`` gives back the raw value) while writing
  every non-printable character as a JSON ``\\u`` escape, so that JSON on a terminal is inert.
"""

from __future__ import annotations


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def shown(value: str) -> str:
    """A store-originated value, escaped for a terminal (see the module docstring)."""
    if value.isprintable() and "\\" not in value:
        return value
    return "".join("\\\\" if char == "\\" else char if char.isprintable() else _escape(char)
                   for char in value)


def safe_text(text: str) -> str:
    """A whole message for a terminal: non-printable characters escaped, line breaks kept."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or char == "\n" else _escape(char)
                   for char in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON spells characters beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_safe(document: str) -> str:
    """JSON text (from ``json.dumps``) with every non-printable character ``\\u``-escaped.

    Only string contents can hold such characters (the structure is printable ASCII and line
    breaks), and a ``\\u`` escape decodes to the same character: the data is unchanged.
    """
    if document.isprintable():
        return document
    return "".join(char if char.isprintable() or char == "\n" else _json_escape(char)
                   for char in document)
