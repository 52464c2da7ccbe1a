"""CurveZMQ for farm links: key files, and the socket options that use them.

    envfarm keygen keys/ broker        # keys/broker.key (public), keys/broker.key_secret
    envfarm keygen keys/ worker-1
    envfarm broker --curve-secret keys/broker.key_secret --curve-clients keys/clients/
    envfarm worker --broker tcp://head:5555 --curve-secret keys/worker-1.key_secret --broker-key keys/broker.key

The broker admits only peers whose public key file (`*.key`) is in its clients directory; an
unlisted or plaintext peer gets no connection at all. A trainer's data socket, which its leased
workers connect to, is a Curve server too: it admits only the keys of workers leased to it, as
the broker reports them. Off by default: on ipc and loopback the operating system already
confines who can connect; on a real network, turn it on.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

KeyPair = tuple[bytes, bytes]  # (public, secret), z85


def keygen(directory: str, name: str, owner: tuple[int, int] | None = None) -> tuple[str, str]:
    """Writes a key pair; returns the (public, secret) file paths. The secret file is private to its
    owner: this process's user, or `owner` (uid, gid; -1 keeps the group), the user a container
    that mounts it runs as (giving files away takes root, unless `owner` is this user)."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    if owner is not None:
        try:
            for path in (public, secret):
                os.chown(path, *owner)
        except PermissionError:
            os.unlink(public)
            os.unlink(secret)
            raise
    return public, secret


def unreadable(path: str) -> str | None:
    """Why this process cannot read the key file `path`, or the folder of key files `path` and
    its subfolders, or None if it can: named, with this process's uid and the file's owner and
    mode. (A compose file secret is a bind mount that keeps the host's owner and mode, so a 0600
    key of the host's user is closed to a container's user.)"""
    paths = [path]
    if os.path.isdir(path):
        for folder, folders, files in os.walk(path):
            paths += [os.path.join(folder, name) for name in folders + files]
    for each in paths:
        directory = os.path.isdir(each)
        if os.access(each, os.R_OK | (os.X_OK if directory else 0)):
            continue
        try:
            status = os.stat(each)
        except FileNotFoundError:
            return f"{each} does not exist"
        except OSError:
            return f"cannot read {each} as uid {os.getuid()}: a folder on its path is closed to this user"
        # Never advise running as root: as uid 0 with the host's IPC namespace, a worker could write
        # every root-owned shared-memory segment on the host.
        owner = f", or run this process as uid {status.st_uid} (compose: ENVFARM_UID)" if status.st_uid else ""
        return (
            f"cannot read {each} as uid {os.getuid()} (it is uid {status.st_uid}'s, mode "
            f"{status.st_mode & 0o777:04o}): give it to this user (chown {os.getuid()} FILE, or "
            f"envfarm keygen --owner {os.getuid()} as root){owner}"
        )
    return None


def load_key_pair(secret_file: str) -> KeyPair:
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (give the .key_secret file, not the .key)")
    return public, secret


def load_public_key(public_file: str) -> bytes:
    return zmq.auth.load_certificate(public_file)[0]


def secure_client(socket: zmq.Socket, keys: KeyPair, server_key: bytes) -> None:
    """A connecting socket: proves its own key, and accepts only a server holding `server_key`."""
    socket.curve_publickey, socket.curve_secretkey = keys
    socket.curve_serverkey = server_key


class ZapHandler:
    """Answers a bound Curve socket's ZAP requests (RFC 27) by `admits(z85 public key)`, each on its own.

    pyzmq's authenticator answers one request at a time; an unknown key that must be waited for
    (a leased worker may connect before its trainer has read the lease that names it) then holds
    up every key behind it. libzmq gives each connecting session its own pipe to the ZAP
    endpoint, so a ROUTER here can answer out of order: an admitted key at once, one not admitted
    yet parked until `wake()` finds it admitted, or refused after `wait` seconds. At most
    `max_parked` wait at a time; beyond that a key is refused at once (a flood of strangers
    must not grow memory)."""

    RECHECK = 0.1  # seconds between looks at the parked keys even unwoken: `admits` may change without a wake

    def __init__(self, context: zmq.Context, admits: Callable[[bytes], bool], wait: float = 2.0, max_parked: int = 256):
        self.admits, self.wait, self.max_parked = admits, wait, max_parked
        self.parked: dict[bytes, tuple[float, bytes, list[bytes]]] = {}  # ZAP routing id: (deadline, key, reply head)
        self._stopped = False
        self._pipe_lock = threading.Lock()  # no write to a pipe `stop` has closed (its fd may be reused)
        # Bound here, before the Curve socket can take a connection: with no ZAP handler bound,
        # libzmq lets every Curve client in.
        self._zap = context.socket(zmq.ROUTER)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind("inproc://zeromq.zap.01")
        self._wake_read, self._wake_write = os.pipe()  # a pipe: `wake` may be called from any thread
        os.set_blocking(self._wake_write, False)
        self._thread = threading.Thread(target=self._run, name="envfarm-zap", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Has the parked keys looked at again now (call after `admits` has come to admit more)."""
        with self._pipe_lock:
            if self._wake_write < 0:
                return
            try:
                os.write(self._wake_write, b"w")
            except BlockingIOError:  # a full pipe: a wake is pending already
                pass

    def stop(self) -> None:
        self._stopped = True
        self.wake()
        self._thread.join(2)
        with self._pipe_lock:
            if not self._thread.is_alive() and self._wake_write >= 0:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_write = -1

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            while not self._stopped:
                timeout = None
                if self.parked:
                    next_deadline = min(deadline for deadline, _, _ in self.parked.values())
                    timeout = max(0.0, min(self.RECHECK, next_deadline - time.monotonic())) * 1000
                events = dict(poller.poll(timeout))
                if self._wake_read in events:
                    os.read(self._wake_read, 4096)
                while self._zap in events and not self._stopped:
                    try:
                        self._request(self._zap.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                self._review()
        finally:
            self._zap.close(linger=0)

    def _request(self, frames: list[bytes]) -> None:
        # From a ROUTER: [routing id, b"", version, request id, domain, address, identity, mechanism, credentials...]
        if len(frames) < 8 or frames[1] != b"":
            return  # not from libzmq: no one to answer
        rid, _, version, request_id, _, _, _, mechanism, *credentials = frames
        head = [rid, b"", b"1.0", request_id]
        if version != b"1.0" or mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._reply(head, b"400", b"Not a Curve request")
            return
        key = z85.encode(credentials[0])
        if self.admits(key):
            self._reply(head, b"200", b"OK", key)
        elif len(self.parked) < self.max_parked:
            self.parked[rid] = (time.monotonic() + self.wait, key, head)
        else:
            self._reply(head, b"400", b"Too many unknown keys")

    def _review(self) -> None:
        now = time.monotonic()
        for rid, (deadline, key, head) in list(self.parked.items()):
            if self.admits(key):
                self._reply(head, b"200", b"OK", key)
            elif now >= deadline:
                self._reply(head, b"400", b"Key not admitted")
            else:
                continue
            del self.parked[rid]

    def _reply(self, head: list[bytes], status: bytes, text: bytes, user: bytes = b"") -> None:
        # A session gone since its request has no route: the ROUTER drops the reply.
        self._zap.send_multipart([*head, status, text, user, b""])


def secure_server(
    context: zmq.Context,
    socket: zmq.Socket,
    keys: KeyPair,
    clients: str | Callable[[bytes], bool],
    *,
    wait: float = 2.0,
) -> ThreadAuthenticator | ZapHandler:
    """A bound socket: encrypts with `keys` and admits only the client keys listed in the directory
    `clients`, or those for which `clients(z85 key)` is true; a key `clients` refuses is looked at
    again for `wait` seconds (on the returned handler's `wake()`, and every 0.1 s) before it is
    refused. Stop the returned authenticator when the socket closes. Call before `bind`, and
    only one per context (each binds the context's ZAP endpoint)."""
    if isinstance(clients, str) and not os.path.isdir(clients):
        raise ValueError(f"{clients} is not a directory of client public keys")
    if isinstance(clients, str):
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=clients)
    else:
        authenticator = ZapHandler(context, clients, wait)
    socket.curve_server = True
    socket.curve_publickey, socket.curve_secretkey = keys
    return authenticator


# Roles of the keys a broker admits: the subdirectories of its clients directory that list them.
WORKERS, TRAINERS, ADMINS = "workers", "trainers", "admins"


def load_roles(directory: str) -> dict[str, frozenset[str]] | None:
    """The roles of each admitted public key (z85), from `directory/workers/`, `trainers/` and
    `admins/` (a key may be in several). None if the directory has none of them: then it lists its
    keys itself, and each may do everything (as before roles). A directory with both role
    subdirectories and keys of its own is refused: which role those keys have would be a guess."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory of client public keys")
    present = [role for role in (WORKERS, TRAINERS, ADMINS) if os.path.isdir(os.path.join(directory, role))]
    if not present:
        return None
    if zmq.auth.load_certificates(directory):
        raise ValueError(
            f"{directory} has role subdirectories ({', '.join(present)}) and keys of its own: move each key into the directory of its role"
        )
    roles: dict[str, set[str]] = {}
    for role in present:
        for key in zmq.auth.load_certificates(os.path.join(directory, role)):
            roles.setdefault(key.decode("ascii"), set()).add(role)
    return {key: frozenset(held) for key, held in roles.items()}
