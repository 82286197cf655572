"""Log lines a peer cannot flood: the same complaint is logged once a minute (Python 3.6+, no dependencies)."""
import time

EVERY_S = 60.0
MAX_KEYS = 4096  # complaints remembered at most (past that the memory starts afresh)


class Throttled:
    """`say(key, line)` passes `line` to `log` unless the same `key` was said within the last `every_s` seconds."""

    def __init__(self, log, every_s=EVERY_S):
        self.log, self.every_s = log, every_s
        self._said = {}

    def __call__(self, key, line):
        now = time.monotonic()
        if now - self._said.get(key, -self.every_s) < self.every_s:
            return False
        if len(self._said) >= MAX_KEYS:
            self._said.clear()
        self._said[key] = now
        self.log(line)
        return True
