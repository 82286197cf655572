"""Who turns the dispatcher's loop (`Dispatcher._step`): the thread that owns its ZeroMQ socket.

ZeroMQ sockets are not thread-safe, so one owner at a time does every socket operation:
- caller-driven (the batch evaluation, the benchmarks): the one thread that uses the dispatcher; a call runs at once,
  and `Request.wait` turns the loop until its answer is in;
- the dispatcher's own I/O thread (the service, and any caller on any thread): calls are queued for it and it is
  woken through a pipe;
- an asyncio loop (`attach`, while the HTTP server runs): its reader callbacks on the socket's file descriptor and a
  timer for the next deadline turn the dispatcher, a coroutine's call runs at once on the loop (no thread switch),
  and other threads' calls reach it through the loop. `detach` gives the socket back to a new I/O thread.

Device-side module: Python 3.6+, pyzmq (the dispatcher mixes it in).
"""
import os
import threading
import time

import zmq


class SocketOwner:
    """The part of collab.dispatch.Dispatcher that decides which thread turns its loop (see the module's doc)."""

    def _own(self, threaded):
        """Start as the I/O thread's (threaded) or the caller's: once the socket, the poller and the wake pipe exist."""
        self.caller_driven = not threaded
        self.aloop = self._loop_thread = self._timer = None  # attached to an asyncio loop (`attach`)
        self._handing_over = False
        self.thread = None
        if threaded:
            self._start_thread()

    def _call(self, fn):
        if self.caller_driven:
            return fn()  # this is the thread that owns the socket
        loop = self.aloop
        if loop is not None and threading.get_ident() == self._loop_thread:
            fn()  # a coroutine on the attached loop: no thread in between
            return self._recheck()
        self._calls.put(fn)
        loop = self.aloop  # (read after the put: a detach in between restarts the thread, which finds it queued)
        if loop is None:
            return self._wake()
        try:
            loop.call_soon_threadsafe(self._loop_turn)
        except RuntimeError:  # the loop has closed without detaching: the dispatcher is closing
            pass

    def _pause(self, seconds):
        """Wait (holding `changed`) at most `seconds` for news: the I/O thread's (or the attached loop's), or
        caller-driven, the loop's."""
        if self.caller_driven:
            self._step(max(0, int(seconds * 1e3)))
        else:
            self.changed.wait(seconds)

    def _drive(self, done, timeout):
        """Caller-driven `Request.wait`: turn the loop until `done` is set (True) or `timeout` s pass (False)."""
        end = None if timeout is None else time.perf_counter() + timeout
        while not done.is_set():
            left_ms = self._poll_ms()
            if end is not None:
                left = end - time.perf_counter()
                if left <= 0:
                    return False
                left_ms = min(left_ms, int(left * 1e3) + 1)
            if not self._step(left_ms):
                return done.is_set()
        return True

    def _wake(self):
        try:
            os.write(self._wake_w, b'x')
        except OSError:
            pass


    def _start_thread(self):
        self.thread = threading.Thread(target=self._loop, name='collab-dispatcher', daemon=True)
        self.thread.start()

    def _loop(self):
        while not self._closing and not self._handing_over and self._step(self._poll_ms()):
            pass

    def attach(self, loop):
        """Hand the socket from the I/O thread to the running asyncio `loop` (call this on it): the loop's reader
        callbacks turn the dispatcher from then on, so a coroutine's request costs no thread switch, to the I/O
        thread or back; other threads' calls reach it through the loop. `detach` (on the loop, before it stops)
        gives the socket back to a new I/O thread."""
        if self.caller_driven or self.aloop is not None or self._closing:
            return
        self._handing_over = True
        self._wake()
        self.thread.join()
        self._handing_over, self.thread = False, None
        self._loop_thread = threading.get_ident()
        self.aloop = loop
        for s in (self.sock, self.mon):
            loop.add_reader(s.getsockopt(zmq.FD), self._loop_turn)
        self._loop_turn()  # what arrived, or was called, during the hand-over

    def detach(self):
        """The socket back to an I/O thread of its own (on the attached loop; nothing when not attached)."""
        loop = self.aloop
        if loop is None or self._closing:
            return
        for s in (self.sock, self.mon):
            loop.remove_reader(s.getsockopt(zmq.FD))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.aloop = None
        self._start_thread()  # (its first turn takes what was queued for the loop meanwhile)

    def _loop_turn(self):
        """One turn on the attached loop: a socket became readable, another thread called, or a deadline came."""
        if self.aloop is not None and not self._closing and self._step(0):
            self._recheck()

    def _on_timer(self):
        self._timer = None
        self._loop_turn()

    def _recheck(self):
        """After the attached loop used the socket: ZeroMQ's file descriptor signals only changes, so what is
        already waiting is looked at again now; and the next deadline gets a timer."""
        loop = self.aloop
        if loop is None:
            return
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN or self.mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            loop.call_soon(self._loop_turn)
        elif self.open and self._timer is None:
            self._timer = loop.call_later(self._poll_ms() / 1e3, self._on_timer)
