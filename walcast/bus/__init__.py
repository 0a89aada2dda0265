"""The Redis bus: one reader stores routed events in Redis Streams; any number of gateway
nodes feed their hubs from them and serve resumes from them.

Modules, in the order the data moves: `keys` (key names, entry ids), `codec` (the entries'
wire format), `sink` (the reader's side: batches into the streams), `leader` (one reader per
slot at a time), `feed` (a node's side: live events and the `History` of resumes), `client`
(the Redis client and its transient failures), `app` (aiohttp wiring).
"""

from walcast.bus.app import BUS_KEYS, install_node, make_feed, make_reader_app, reader_context
from walcast.bus.client import redis_client
from walcast.bus.codec import Event, decode_events, encode_events
from walcast.bus.feed import RedisFeed, complete_after
from walcast.bus.keys import BusKeys, parse_stream_id, prefix_from_env, stream_id
from walcast.bus.leader import ReaderService, reader_lock_key
from walcast.bus.sink import PUBLISH_SCRIPT, HistoryLost, RedisSink

__all__ = [
    "BUS_KEYS",
    "PUBLISH_SCRIPT",
    "BusKeys",
    "Event",
    "HistoryLost",
    "ReaderService",
    "RedisFeed",
    "RedisSink",
    "complete_after",
    "decode_events",
    "encode_events",
    "install_node",
    "make_feed",
    "make_reader_app",
    "parse_stream_id",
    "prefix_from_env",
    "reader_context",
    "reader_lock_key",
    "redis_client",
    "stream_id",
]
