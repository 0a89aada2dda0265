"""The writer of `test_load.py::test_load_large`, run as its own process.

    python -m tests.load_writer SPEC_JSON OUT_PATH

SPEC_JSON carries the database URL, the walcast URL, the load shape and the seed. The process
commits rows and sends broadcasts at the shape's rates (each paced by a monotonic clock), then
one `end` broadcast per organization, and writes to OUT_PATH exactly what it committed (the
verifier's input) plus its timings. `time.monotonic()` is system-wide on Linux, so the test
process can compare its own clock with the `finished` time written here.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.fix_gateway import ACCESS_TOKEN
from tests.test_load import Shape, Written, _broadcast, _org, _write


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    shape = Shape(**spec["shape"])
    url = spec["url"]
    written = Written()
    headers = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:

        async def send(body: dict[str, Any]) -> int:
            async with http.post(
                f"{url}/realtime/v1/broadcast", data=orjson.dumps(body)
            ) as response:
                await response.read()
                return response.status

        started = time.monotonic()
        await asyncio.gather(
            _write(spec["dsn"], shape, written, random.Random(spec["seed"])),
            _broadcast(send, shape, written, random.Random(spec["seed"])),
        )
        finished = time.monotonic()
        for org in range(shape.orgs):
            assert await send({"organizationId": _org(org), "event": "end"}) == 202
    return {
        "shape": asdict(shape),
        "started": started,
        "finished": finished,
        "changes": written.changes,
        "broadcasts": written.broadcasts,
        "rows": written.rows,
    }


if __name__ == "__main__":
    Path(sys.argv[2]).write_bytes(orjson.dumps(asyncio.run(main(orjson.loads(sys.argv[1])))))
