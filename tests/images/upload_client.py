"""Concurrent uploads from a process of their own, as real clients are (not the node's loop).

    python -m tests.images.upload_client URL AUTHORIZATION FILE...

POSTs every FILE at once (one thread and connection each) as the multipart field `file`, and
prints the list of response statuses as one JSON line when all have answered.
"""

from __future__ import annotations

import http.client
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from tests.images.uploads import MULTIPART, form_body

TIMEOUT_S = 120


def upload(url: str, authorization: str, path: str) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)
    try:
        conn.request(
            "POST",
            parts.path,
            body=form_body(Path(path).read_bytes()),
            headers={"Authorization": authorization, "Content-Type": MULTIPART},
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def main() -> None:
    url, authorization, *paths = sys.argv[1:]
    # Started ahead of time, so the interpreter's start is not measured as upload load: say
    # so, then wait for the word.
    print("ready", flush=True)
    sys.stdin.readline()
    with ThreadPoolExecutor(len(paths)) as pool:
        statuses = list(pool.map(lambda path: upload(url, authorization, path), paths))
    print(json.dumps(statuses), flush=True)


if __name__ == "__main__":
    main()
