"""A juggler server, a callee pool and a client in one process.

Uses the redis at $JUGGLER_REDIS_URL, or an in-memory fakeredis when it is not set.
Run: python examples/quickstart.py
"""

import os

import fakeredis
import redis

from juggler import Callee, Client, RedisBroker, Server

url = os.environ.get("JUGGLER_REDIS_URL")
r = redis.Redis.from_url(url) if url else fakeredis.FakeRedis()
broker = RedisBroker(r)

callee = Callee(broker, workers=4)
callee.register("test.echo", lambda args: args)
callee.register("test.reverse", lambda args: args[::-1])

with Server(broker, host="127.0.0.1", port=0) as server, callee:
    print("server listening on", server.url)
    with Client.connect(server.url) as c:
        print("call test.echo ->", c.call("test.echo", "hello", timeout=5.0))
        print("call test.reverse ->", c.call("test.reverse", "juggler", timeout=5.0))
        sub = c.sub("news.*", pattern=True)
        c.pub("news.today", {"title": "juggler 0.1"})
        event = sub.get(timeout=5.0)
        print(f"event on {event.channel} (pattern {event.pattern}):", event.args)
