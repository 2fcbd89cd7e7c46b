"""Prints every state change Home Assistant makes, as one JSON line each, for tests/homeassistant.rs.

Run with the Python of Home Assistant's own environment (aiohttp comes with it):
    python homeassistant_states.py ws://127.0.0.1:PORT/api/websocket TOKEN
It prints {"ready": true} once subscribed, then {"entity_id", "old", "new", "at"} per change
("at": Home Assistant's time of the change, seconds since the epoch), until its stdin closes or
the connection ends.
"""

import asyncio
import json
import sys
from datetime import datetime

import aiohttp


def say(line):
    print(json.dumps(line), flush=True)


def stamp(iso):
    return datetime.fromisoformat(iso).timestamp()


async def record(url, token):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            await ws.receive_json()  # auth_required
            await ws.send_json({"type": "auth", "access_token": token})
            reply = await ws.receive_json()
            if reply.get("type") != "auth_ok":
                raise SystemExit(f"authentication refused: {reply}")
            await ws.send_json(
                {"id": 1, "type": "subscribe_events", "event_type": "state_changed"}
            )
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if data.get("type") == "result" and data.get("id") == 1:
                    say({"ready": data.get("success", False)})
                elif data.get("type") == "event":
                    event = data["event"]["data"]
                    old, new = event.get("old_state"), event.get("new_state")
                    say(
                        {
                            "entity_id": event["entity_id"],
                            "old": old and old["state"],
                            "new": new and new["state"],
                            "at": new and stamp(new["last_changed"]),
                        }
                    )


async def main():
    url, token = sys.argv[1], sys.argv[2]
    recorder = asyncio.create_task(record(url, token))
    # Stop when the test closes our stdin (or dies).
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    done, _ = await asyncio.wait(
        [recorder, stdin_closed], return_when=asyncio.FIRST_COMPLETED
    )
    for task in done:
        if task is recorder:
            task.result()
    recorder.cancel()


if __name__ == "__main__":
    asyncio.run(main())
