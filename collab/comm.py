"""Point-to-point messages between the aggregator and the workers: torch.distributed, gloo over TCP.

Every pair of ranks that talks has its own gloo group. A gloo receive that times out closes every connection of
its group ("Application timeout caused pair closure"), so with one group for the whole world a single stalled
worker would cut the aggregator off from all of them; with a group per pair it cuts only its own link, and
--dropout-tolerant can go on with the others.

Tensors are staged on CPU (gloo's transport); the byte counters hold tensor payload bytes, by kind
('input', 'tokens', 'activations', 'output', 'control'), sent and received by this rank.
"""
import datetime
import os
import time
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist

import utils

# Control words: the first element of every request header [command, batch size, index of the first image].
STOP, RUN = 0, 1
HEADER_LEN = 3
# Warm-up requests carry this image index, so the fault hooks and the statistics can tell them apart.
WARMUP = -1


class PeerError(RuntimeError):
    """A peer that died, stalled past the timeout or broke the protocol; `rank` names it."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torch.distributed.launch --use_env and torchrun; (0, 1, 0) plain."""
    env = os.environ
    return int(env.get('RANK', '0')), int(env.get('WORLD_SIZE', '1')), int(env.get('LOCAL_RANK', '0'))


def init_gloo(timeout_s: float) -> None:
    """Join the launcher's process group with gloo, whatever the compute device: tokens travel through CPU."""
    rank, world, _ = env_rank()
    if 'LOCAL_RANK' in os.environ:
        utils.exit_with_launcher()  # a rank must not outlive a killed launcher
    dist.init_process_group('gloo', init_method='env://', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _describe(err: Exception, timeout_s: float | None) -> str:
    text = str(err)
    if 'Timed out' in text or 'timeout' in text.lower():
        return f'did not answer within {timeout_s:g} s (stalled?)' if timeout_s else 'timed out'
    if 'closed' in text.lower() or 'reset' in text.lower() or 'broken pipe' in text.lower():
        return 'closed the connection (process died?)'
    return text.splitlines()[0] if text else type(err).__name__


class Pending(NamedTuple):
    work: dist.Work
    peer: int
    tensor: torch.Tensor
    kind: str
    sending: bool


class Links:
    """This rank's links: byte-counting isend/irecv and waits bounded by a deadline.

    pairs: every pair of ranks that will talk, identical on all ranks (creating a group is collective).
    timeout_s: the groups' own timeout, for waits without a deadline (a worker waiting for its next request).
    """

    def __init__(self, pairs: Iterable[tuple[int, int]], timeout_s: float):
        self.rank = dist.get_rank()
        self.groups: dict[int, dist.ProcessGroup] = {}
        for a, b in pairs:
            group = dist.new_group([a, b], backend='gloo', timeout=datetime.timedelta(seconds=timeout_s))
            if self.rank in (a, b):
                self.groups[b if self.rank == a else a] = group
        self.sent: Counter = Counter()
        self.received: Counter = Counter()

    def isend(self, tensor: torch.Tensor, peer: int, kind: str) -> Pending:
        tensor = tensor.detach().to('cpu').contiguous()
        return Pending(self._post(dist.isend, tensor, peer), peer, tensor, kind, True)

    def irecv(self, shape, dtype: torch.dtype, peer: int, kind: str) -> Pending:
        tensor = torch.empty(shape, dtype=dtype)
        return Pending(self._post(dist.irecv, tensor, peer), peer, tensor, kind, False)

    def _post(self, op, tensor, peer):
        try:
            return op(tensor, peer, group=self.groups[peer])
        except RuntimeError as err:  # gloo refuses to post on a link it already closed
            raise PeerError(peer, _describe(err, None)) from None

    def wait(self, pending: Pending, deadline: float | None = None, timeout_s: float | None = None
             ) -> torch.Tensor:
        """Wait for one message until `deadline` (time.perf_counter() value; None: the group's timeout).

        Returns the tensor (received, or sent); raises PeerError naming the peer on a timeout or a closed link.
        """
        wait_for = datetime.timedelta(0)  # 0 means: the group's timeout
        if deadline is not None:
            wait_for = datetime.timedelta(seconds=max(deadline - time.perf_counter(), 1e-3))
        try:
            pending.work.wait(wait_for)
        except RuntimeError as err:
            raise PeerError(pending.peer, _describe(err, timeout_s)) from None
        nbytes = pending.tensor.numel() * pending.tensor.element_size()
        (self.sent if pending.sending else self.received)[pending.kind] += nbytes
        return pending.tensor

    def send(self, tensor: torch.Tensor, peer: int, kind: str, deadline: float | None = None,
             timeout_s: float | None = None) -> None:
        self.wait(self.isend(tensor, peer, kind), deadline, timeout_s)

    def recv(self, shape, dtype: torch.dtype, peer: int, kind: str, deadline: float | None = None,
             timeout_s: float | None = None) -> torch.Tensor:
        return self.wait(self.irecv(shape, dtype, peer, kind), deadline, timeout_s)

    def totals(self) -> dict[str, int]:
        """Bytes by kind, both directions summed (each message counted once on each end)."""
        return dict(self.sent + self.received)


def header(cmd: int, batch: int = 0, first_index: int = WARMUP) -> torch.Tensor:
    """A request header: [command, batch size, index of the batch's first image (WARMUP for warm-up)]."""
    return torch.tensor([cmd, batch, first_index], dtype=torch.int64)
