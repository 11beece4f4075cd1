"""LMCache PD mode of the simulated engine (LMCacheConnectorV1 with `enable_pd`).

Modules: ``config`` (options and test switches), ``chunks`` (what a prompt saves), ``buffer``
(one-chunk pages: reserve, take, give back), ``sender`` (prefiller), ``receiver`` (decoder),
``stats``, ``wire`` (LMCache's ProxyNotif bytes), ``mode`` (what the server runs), ``cli``
(command-line options). This file imports none of them, so
``pdsim.config`` can use ``pdsim.lmcache.config`` without importing the engine.

Sender (prefiller, LMCache `pd_role: sender`): a request whose `kv_transfer_params` carries a
`disagg_spec` pushes its prompt's KV chunks, once prefilled, to the receiver named there: TP rank
r writes to `receiver_host:receiver_alloc_port[r]` (after a one-time hello on
`receiver_init_port[r]`), then sends LMCache's real `ProxyNotif(req_id)` wire message over ZMQ PUSH
to `pd_proxy_host:pd_proxy_port`. With `ret_first_tok` the response carries
`kv_transfer_params: {"first_tok": <id>}`. In PD mode LMCache saves the partial last chunk too
(`save_unfull_chunk`, forced on by PD since 0.3.11), so every prompt notifies; LMCache 0.3.12 to
0.4.1 lost that (LMCache #2510): they save full chunks only, and a prompt shorter than one chunk
pushes nothing and never notifies. `save_unfull_chunk=False` (`--lmcache-discard-partial-chunks`)
gives that behaviour, as `discard_partial_chunks: true` does in any version.

Receiver (decoder, `pd_role: receiver`): TP rank r listens on init port r and alloc port r and
keeps what was pushed in its receive buffer, a finite number of one-chunk pages (``buffer``).
A request is served from pushed KV when every rank holds its leading chunks (counted as a hit);
otherwise it recomputes (counted). Pages are taken on push and given back only when a request
retrieves the chunks; a full buffer holds pushes back, and then the prefiller itself
(``sender``, ``receiver``). ``GET /_sim/lmcache/buffers`` and the ``pdsim:lmcache_buffer_*`` /
``pdsim:lmcache_staging_*`` metrics show each rank's occupancy.

The sim's own transfer channel is HTTP (not NIXL): `POST /lmcache/init` on an init port and
`POST /lmcache/put {"req_id", "keys"}` on an alloc port. Switches for tests (`POST /_sim/lmcache`)
drop or delay notifications.
"""
