"""State that the serving processes of `pdproxy serve --workers N` share, so that N processes
route and admit as one: the engines' load counters (loadtable.py) and the global admission
(admission.py, on the shared slot table of slots.py, with wake-ups between processes in
doorbell.py), both over named shared memory (segment.py). The control process creates them by
name; each serving process attaches with its own index. The load table is plain shared memory;
the admission also needs Linux (its lock is flock on the segment's file under /dev/shm, its
doorbells abstract Unix sockets)."""
