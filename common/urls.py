"""Service URLs: redacting their password for logs, and naming another database or vhost on the same server."""

from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit, urlunsplit


def redact(url: str) -> str:
    """The URL with its password replaced, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def login_name(url: str) -> str | None:
    """The user the URL logs in as."""
    username = urlsplit(url).username
    return None if username is None else unquote(username)


def with_login(url: str, user: str, password: str) -> str:
    """The URL logging in as `user` with `password` on the same server and path."""
    parts = urlsplit(url)
    host = f"{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def scrub(text: str, *urls: str) -> str:
    """`text` (an exception's, which may quote a URL) with the password of each URL replaced by ***."""
    for url in urls:
        if password := urlsplit(url).password:
            for form in {password, unquote(password)}:
                text = text.replace(form, "***")
    return text


def path_name(url: str) -> str:
    """The database or vhost the URL names (its path, without the leading slash)."""
    return urlsplit(url).path.lstrip("/")


def with_path(url: str, path: str, *, scheme: str | None = None) -> str:
    """The URL naming `path` (a database or a vhost) on the same server, optionally with another scheme."""
    parts = urlsplit(url)._replace(path=f"/{path}")
    return urlunsplit(parts._replace(scheme=scheme) if scheme else parts)
