"""CurveZMQ for farm links: key files, and the socket options that use them.

    envfarm keygen keys/ broker        # keys/broker.key (public), keys/broker.key_secret
    envfarm keygen keys/ worker-1
    envfarm broker --curve-secret keys/broker.key_secret --curve-clients keys/clients/
    envfarm worker --broker tcp://head:5555 --curve-secret keys/worker-1.key_secret --broker-key keys/broker.key

The broker admits only peers whose public key file (`*.key`) is in its clients directory; an
unlisted or plaintext peer gets no connection at all. Off by default: on ipc and loopback the
operating system already confines who can connect; on a real network, turn it on.
"""

from __future__ import annotations

import os

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Writes a key pair; returns the (public, secret) file paths. The secret file is private to its owner."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def secure_client(socket: zmq.Socket, secret_file: str, server_public_file: str) -> None:
    """A worker's or trainer's socket: proves its own key, and accepts only the broker's."""
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (give the .key_secret file, not the .key)")
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = public, secret, server_public


def secure_server(context: zmq.Context, socket: zmq.Socket, secret_file: str, clients_directory: str) -> ThreadAuthenticator:
    """The broker's socket: encrypts with its key and admits only the listed client keys. Stop the
    returned authenticator when the socket closes."""
    if not os.path.isdir(clients_directory):
        raise ValueError(f"{clients_directory} is not a directory of client public keys")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (give the .key_secret file, not the .key)")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=clients_directory)
    socket.curve_server = True
    socket.curve_publickey, socket.curve_secretkey = public, secret
    return authenticator
