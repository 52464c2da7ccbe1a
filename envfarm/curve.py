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
from typing import Callable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

KeyPair = tuple[bytes, bytes]  # (public, secret), z85


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Writes a key pair; returns the (public, secret) file paths. The secret file is private to its owner."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


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


class _Admitted:
    """pyzmq's credentials-provider interface over a predicate on z85 public keys."""

    def __init__(self, admits: Callable[[bytes], bool]):
        self.admits = admits

    def callback(self, domain: str, key: bytes) -> bool:
        return self.admits(key)


def secure_server(context: zmq.Context, socket: zmq.Socket, keys: KeyPair, clients: str | Callable[[bytes], bool]) -> ThreadAuthenticator:
    """A bound socket: encrypts with `keys` and admits only the client keys listed in the directory
    `clients`, or those for which `clients(z85 key)` is true. Stop the returned authenticator
    when the socket closes. Call before `bind`."""
    if isinstance(clients, str) and not os.path.isdir(clients):
        raise ValueError(f"{clients} is not a directory of client public keys")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    if isinstance(clients, str):
        authenticator.configure_curve(domain="*", location=clients)
    else:
        authenticator.configure_curve_callback(domain="*", credentials_provider=_Admitted(clients))
    socket.curve_server = True
    socket.curve_publickey, socket.curve_secretkey = keys
    return authenticator
