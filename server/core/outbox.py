"""One stream's outbox: messages the engine side made and the door has not sent yet."""

from __future__ import annotations

import asyncio
from collections import deque

from server.core.types import Chunk, merge_chunks


class Outbox:
    """One stream's chunks made by the engine side and not yet taken by the door.

    ``bytes`` counts the queued chunks (``Chunk.nbytes``) plus the one the consumer is
    writing (``get`` hands it out, ``sent`` takes it off once the write returned), so a
    write stuck on flow control still counts. ``put`` returns False once ``bytes`` is over
    ``cap``, not counting the reads of prompt positions (``exempt``): those arrive at once
    after prefill, however fast the client reads, and the producer splits them into parts
    of at most ``part`` bytes. A consumer that fell behind gets what queued up merged into
    messages of at most ``part`` bytes (as vLLM merges the outputs of a slow reader), so a
    busy server writes fewer, larger messages.
    """

    def __init__(self, cap: int, part: int | None = None) -> None:
        self.cap = cap
        self.part = part or max(cap // 4, 1)
        self.queue: deque[tuple[Chunk, int, int]] = deque()  # (chunk, bytes, exempt bytes)
        self.bytes = 0
        self.exempt = 0
        self.done = False
        self.dropped = False  # ended by the cap: queued messages were discarded
        self.error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, chunk: Chunk, exempt: int = 0) -> bool:
        size = chunk.nbytes()
        self.queue.append((chunk, size, exempt))
        self.bytes += size
        self.exempt += exempt
        self._ready.set()
        return self.bytes - self.exempt <= self.cap

    def fail(self, error: BaseException | None, drop: bool = False) -> None:
        """No more messages: the stream ends after the queued ones (all dropped with
        ``drop``), with ``error`` raised to the consumer if given."""
        if drop:
            self.bytes -= sum(size for _, size, _ in self.queue)
            self.exempt -= sum(ex for _, _, ex in self.queue)
            self.queue.clear()
            self.dropped = True
        self.done, self.error = True, error
        self._ready.set()

    async def get(self) -> tuple[Chunk, int, int] | None:
        """The next message with its bytes and exempt bytes (give both back to ``sent``);
        None at the end; raises the stream's error."""
        while not self.queue:
            if self.done:
                if self.error is not None:
                    raise self.error
                return None
            self._ready.clear()
            await self._ready.wait()
        first = self.queue.popleft()
        if not self.queue or first[1] + self.queue[0][1] > self.part:
            return first
        items = [first]
        size, exempt = first[1], first[2]
        while self.queue and size + self.queue[0][1] <= self.part:
            c, n, ex = self.queue.popleft()
            items.append((c, n, ex))
            size += n
            exempt += ex
        return merge_chunks([c for c, _, _ in items]), size, exempt

    def sent(self, size: int, exempt: int = 0) -> None:
        self.bytes -= size
        self.exempt -= exempt
