"""The transport layer: how bytes get from a trainer to its workers, below the protocol.

- channel.py: same-host mailboxes in shared memory, signalled with futexes.
- segments.py: shared-memory segments, created by a trainer and attached by a worker after a nonce proves it reached the same one.
- sockets.py: the ZeroMQ socket options every side sets the same way.
- curve.py: CurveZMQ keys and the admission of peers by key.
- cpus.py: how many CPUs a process may use.

`protocol/` knows nothing of these; `server/` and `client/` use them.
"""
