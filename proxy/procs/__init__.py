"""Several processes behind one port (`workers` > 1): one control process, N serving processes.

    supervisor.py   the control process: the control plane (as in one process) and the serving
                    processes' keeper; publishes the workers, takes the reports in
    serving.py      a serving process's entry: the data plane on the shared listening socket
    channel.py      the framed JSON channel between the two (one Unix socket per process)
    snapshot.py     the workers as published, and their mirror in a serving process's pools
    report.py       what a serving process reports (timings, breaker outcomes, counters,
                    prefill tokens and decode streams), and the control process's intake of it
    link.py         a serving process's end of the channel
    forward.py      the paths a serving process forwards to the control process (admin API,
                    console, /metrics, /stats, /health, /v1/models)
    notify.py       LMCache's notifications: the control process binds their socket and relays
                    each to the serving process that its transfer id names
    kvreplica.py    the exact prefix index (kv_events): the control process subscribes, every
                    serving process plans from a copy that each change is sent to

State the serving processes share, so that N processes route and admit as one, over named shared
memory (segment.py) that the control process creates (shared.py) and each serving process
attaches to with its own index (`wN`: N-1):

    loadtable.py    the engines' load counters (requests in flight, prompt characters): one
                    column per serving process, one row (slot) per engine; a serving process's
                    workers read and write them through their row (snapshot.SharedWorker,
                    report.ReportingPool.track), so every policy sees every process's picks
    admission.py    the global admission, on the shared slot table of slots.py, with wake-ups
                    between processes in doorbell.py: a serving process's in place of one
                    process's `Admission`
    shared.py       the control process's side: creates both, gives each worker its slot (the
                    snapshot carries it), reads both for /stats, /metrics and the console, and
                    frees what a dead serving process held before its replacement starts

The load table is plain shared memory; the admission also needs Linux (its lock is flock on the
segment's file under /dev/shm, its doorbells abstract Unix sockets).

With `workers: 1` (the default) none of this is imported: the proxy is one process, as before.
"""
