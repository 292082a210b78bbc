"""Mask secrets before parameters leave the process (MLflow params, printed configs).

Tracking servers keep params forever and show them to everyone who can see the experiment, so a
token passed through a config key must not reach them. Two rules:

- Keys: a key is secret when one of the words of its last dotted component is a secret word
  (password, token, secret, key, credential, auth, signature, ...). Words are split at
  non-alphanumerics and camelCase humps and must match whole, so ordinary hyperparameters stay
  visible: `proj_dim`, `keep_checkpoints`, `tokenizer`, `num_tokens`, `keyframes` are not
  secrets, while `api_key`, `hfToken`, `AWS_SECRET_ACCESS_KEY`, `db_pass` are. A false positive
  only hides a value; a false negative leaks one, so the word list leans wide.
- Values: every string, under any key, has credentials embedded in URIs masked: the password of
  `scheme://user:password@host` and the values of query parameters with secret names (presigned
  URLs carry `X-Amz-Signature`, `X-Amz-Security-Token`). A bare `https://TOKEN@host` is left as
  it is: a user name cannot be told apart from a token.

Secret keys keep None, "" and booleans (they say whether something is set, not what it is);
every other value becomes "***". Nested mappings and lists are walked with the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "pass", "passphrase",
    "secret", "token", "key", "apikey", "accesskey", "secretkey", "privatekey",
    "credential", "credentials", "auth", "authorization", "cookie", "signature",
})

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<password>[^/\s@]+)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#\s]+)=)(?P<value>[^&;#\s]*)")


def is_secret_key(key: str) -> bool:
    """Whether the last dotted component of `key` names a secret (whole-word match)."""
    last = str(key).rsplit(".", 1)[-1]
    return any(word.lower() in SECRET_WORDS for word in _WORDS.findall(last))


def redact_uri(text: str) -> str:
    """`text` with URI passwords and secret query-parameter values replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _QUERY_PARAM.sub(
        lambda m: f"{m['head']}{MASK}" if m["value"] and is_secret_key(m["name"]) else m[0], text)


def redact_uris(value: Any) -> Any:
    """`value` with credentials in every URI inside it masked, mappings and lists walked; keys are
    not judged (a command's result names its own fields)."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, Mapping):
        return {key: redact_uris(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_uris(item) for item in value]
    return value


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `params` safe to log: secret keys masked, credentials in URIs masked."""
    return {key: _redact_value(key, value) for key, value in params.items()}


def _redact_value(key: str, value: Any) -> Any:
    if is_secret_key(key) and value is not None and value != "" and not isinstance(value, bool):
        return MASK
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, Mapping):
        return redact_params({str(k): v for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value("", item) for item in value)
    return value
