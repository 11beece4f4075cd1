"""The estimated prefix index as one view over the serving processes (`workers` > 1).

Where the routing reads prompt prefixes (prefix_aware, a pool, conditional disaggregation), each
process's index (proxy.place.prefix.PrefixIndex) learns where each prompt's blocks went as it
places them. A process alone would know only its own placements, and its next request with the
same prefix could go elsewhere than the other processes sent it. So each placement that taught
the index something new is also noted for the next report (every 100 ms); the control process
passes it on to every other serving process, which records it as if it had placed it.

What is not new is not sent: a prompt whose last block already had that engine first (a hot
prefix sent to where it is cached). A report carries at most `limit` placements; beyond that they
are left out and counted (`dropped`): a process that places more than that many new prefixes in
100 ms shares a sample of them, and its own index still has them all. Relayed placements are a
report late (100 to 200 ms), against the seconds an engine's cache keeps a block. The control
process does not keep them: it places nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from proxy.place.prefix import PrefixIndex
from proxy.procs.report import Reports

LIMIT = 4096  # placements per report


class RelayedIndex(PrefixIndex):
    """A serving process's prefix index: what it learns goes into the next report too."""

    def __init__(self, reports: Reports, limit: int = LIMIT) -> None:
        super().__init__()
        self.reports = reports
        self.limit = limit

    def record(self, blocks: Sequence[int], url: str) -> None:
        owners = self._blocks.get(blocks[-1]) if blocks else None
        super().record(blocks, url)
        if owners and owners[0] == url:
            return  # nothing the others need
        if len(self.reports.prefixes) < self.limit:
            self.reports.prefixes.append((list(blocks), url))
        else:
            self.reports.prefixes_dropped += 1

    def learn(self, placements: Iterable[tuple[Sequence[int], str]]) -> None:
        """The other processes' placements, relayed by the control process."""
        for blocks, url in placements:
            PrefixIndex.record(self, blocks, url)
            self.reports.prefixes_learned += 1
