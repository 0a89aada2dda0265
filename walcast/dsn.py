"""Connection strings: walcast accepts both libpq forms (URL and `key=value`); asyncpg only
takes URLs, so the gateway's pool gets the URL form."""

from __future__ import annotations

from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict

__all__ = ["to_url"]


def to_url(dsn: str) -> str:
    """The `postgresql://` URL for any libpq connection string."""
    if dsn.startswith(("postgresql://", "postgres://")):
        return dsn
    params = {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
    user = params.pop("user", "")
    password = params.pop("password", "")
    host = params.pop("host", "")
    port = params.pop("port", "")
    dbname = params.pop("dbname", "")
    if host.startswith("/"):  # a Unix socket directory goes in the query string
        params["host"] = host
        host = ""
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else host)
    if port:
        netloc += f":{port}"
    url = f"postgresql://{netloc}/{quote(dbname, safe='')}"
    if params:
        url += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    return url
