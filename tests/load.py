"""Closed-loop HTTP load from its own process (so the clients do not share the caller's GIL):

    python -m tests.load URL CLIENTS SECONDS BODY_JSON_FILE

runs CLIENTS concurrent clients (asyncio, one connection each) posting the body to
URL/v1/embeddings back to back, and prints JSON: answers by status, and transport errors
(timeouts, dropped connections) by type.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp


async def run(url: str, clients: int, seconds: float, body: bytes) -> dict[str, dict[str, int]]:
    codes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    headers = {"content-type": "application/json"}
    # aiohttp, not httpx: httpx's async pool spends more CPU per request at many connections than
    # the daemon does answering it, so on 2 cores an httpx flood is a light one
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as client:

        async def one() -> None:
            while time.monotonic() < deadline:
                try:
                    async with client.post(f"{url}/v1/embeddings", data=body, headers=headers) as resp:
                        await resp.read()
                        codes[str(resp.status)] += 1
                except (aiohttp.ClientError, TimeoutError) as err:
                    errors[type(err).__name__] += 1

        await asyncio.gather(*(one() for _ in range(clients)))
    return {"codes": dict(codes), "errors": dict(errors)}


if __name__ == "__main__":
    url, n, seconds, body_file = sys.argv[1:5]
    result = asyncio.run(run(url, int(n), float(seconds), Path(body_file).read_bytes()))
    print(json.dumps(result))
