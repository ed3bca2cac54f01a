"""CURVE keys for a stream across hosts: key-pair files, loading them safely, and the `bertstream-keys` command.

Without keys the trainer binds loopback by default and trusts whatever connects. With them, ZeroMQ's CURVE
encrypts every frame and authenticates both ends: the trainer holds its secret key and a folder of the
producers' public keys (only those may connect, checked by a ZAP handler), and each producer holds its own
secret key and the trainer's public key (so it cannot be fooled by another trainer). The files are ZeroMQ
certificates, as `zmq.auth.create_certificates` writes them: `NAME.key` (public, to hand out) and
`NAME.key_secret` (secret, owner-only, like an ssh private key, which is why a readable one is refused).

    bertstream-keys keys/ --name trainer --name producer-a --name producer-b
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SECRET_SUFFIX = ".key_secret"
PUBLIC_SUFFIX = ".key"
DEFAULT_NAMES = ("trainer", "producer")
ZAP_DOMAIN = "bertstream"
DENIED_NOTE_S = 5.0  # refused connections are reported at most this often
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class KeyFileError(ValueError):
    """A key file or folder that cannot be used; the message names the flag, the path and the fix."""


@dataclass(frozen=True)
class ServerKeys:
    """The trainer's side: its own key pair and the public keys of the producers allowed to connect."""

    public: bytes = field(repr=False)  # z85, 40 bytes
    secret: bytes = field(repr=False)
    authorized: frozenset[bytes] = field(repr=False)  # z85 public keys
    authorized_dir: str = ""


@dataclass(frozen=True)
class ClientKeys:
    """A producer's side: its own key pair and the trainer's public key."""

    public: bytes = field(repr=False)
    secret: bytes = field(repr=False)
    server_public: bytes = field(repr=False)


# --- loading ---------------------------------------------------------------------------------------------


def _read_certificate(path: Path, flag: str) -> tuple[bytes, bytes | None]:
    from zmq.auth import load_certificate

    if not path.exists():
        raise KeyFileError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise KeyFileError(f"{flag} {path}: not a file")
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{flag} {path}: not a ZeroMQ key file ({exc}); create keys with bertstream-keys") \
            from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeyFileError(f"{flag} {path}: the key is not 40 z85 characters; create keys with bertstream-keys")
    return public, secret


def load_secret_key(path: str | os.PathLike, flag: str = "--curve_secret_key") -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file that only its owner can read."""
    path = Path(path).expanduser()
    public, secret = _read_certificate(path, flag)
    if secret is None:
        raise KeyFileError(f"{flag} {path}: holds only a public key; give the NAME{SECRET_SUFFIX} file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # as ssh does with a private key: refuse rather than use a key others may have copied
        raise KeyFileError(f"{flag} {path}: permissions {mode:04o} let other users read the secret key; "
                           f"run `chmod 600 {path}`")
    return public, secret


def load_public_key(path: str | os.PathLike, flag: str = "--curve_server_key") -> bytes:
    """The public key of a NAME.key file; a file that also holds a secret key is refused (it must not travel)."""
    path = Path(path).expanduser()
    public, secret = _read_certificate(path, flag)
    if secret is not None:
        raise KeyFileError(f"{flag} {path}: holds a secret key; give the public NAME{PUBLIC_SUFFIX} file (the "
                           "secret one stays on its own host)")
    return public


def load_authorized_keys(directory: str | os.PathLike, flag: str = "--curve_authorized_keys") -> frozenset[bytes]:
    """The public keys of every NAME.key file in `directory`; an empty folder is an error, not an open door."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise KeyFileError(f"{flag} {directory}: not a directory")
    files = sorted(directory.glob(f"*{PUBLIC_SUFFIX}"))
    if not files:
        raise KeyFileError(f"{flag} {directory}: no public key files (*{PUBLIC_SUFFIX}) in it, so no producer "
                           "could connect; copy the producers' NAME.key files there")
    return frozenset(load_public_key(path, flag) for path in files)


def server_keys(secret_key_file: str, authorized_dir: str) -> ServerKeys:
    public, secret = load_secret_key(secret_key_file)
    return ServerKeys(public, secret, load_authorized_keys(authorized_dir), str(authorized_dir))


def client_keys(secret_key_file: str, server_key_file: str) -> ClientKeys:
    public, secret = load_secret_key(secret_key_file)
    return ClientKeys(public, secret, load_public_key(server_key_file))


def both_or_neither(first: tuple[str, str | None], second: tuple[str, str | None]) -> None:
    """CURVE needs both files of a side; one alone would silently fall back to no security."""
    (flag_a, a), (flag_b, b) = first, second
    if (a is None) != (b is None):
        given, missing = (flag_a, flag_b) if a is not None else (flag_b, flag_a)
        raise KeyFileError(f"{given} needs {missing} as well (CURVE uses both, or neither for no encryption)")


# --- sockets ---------------------------------------------------------------------------------------------


def configure_client(socket, keys: ClientKeys) -> None:
    """CURVE on a producer's socket, before connect(): encrypted, and only to the trainer holding that key."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.server_public


class _Allowlist:
    """The ZAP credentials check: a key in the folder passes; a refusal is logged at most every DENIED_NOTE_S."""

    def __init__(self, keys: ServerKeys, log):
        self.keys, self.log = keys, log
        self.denied = 0
        self._lock = threading.Lock()
        self._since_note = 0
        self._next_note = 0.0

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.keys.authorized:
            return True
        with self._lock:
            self.denied += 1
            self._since_note += 1
            now = time.monotonic()
            if now >= self._next_note:
                self.log.warning("stream: refused %d connection(s) (%d in all): CURVE key %s... is not in "
                                 "--curve_authorized_keys %s", self._since_note, self.denied,
                                 client_key[:8].decode("ascii", "replace"), self.keys.authorized_dir)
                self._since_note, self._next_note = 0, now + DENIED_NOTE_S
        return False


class CurveServer:
    """CURVE on the trainer's socket plus the ZAP handler that admits only the authorised producers.

    `start()` before bind(); `stop()` before the context is terminated. A producer without CURVE, with a
    key not in the folder, or expecting another server key never completes the handshake, so not one of
    its frames reaches the application.
    """

    def __init__(self, context, keys: ServerKeys, log):
        self.context, self.keys, self.log = context, keys, log
        self.allowlist = _Allowlist(keys, log)
        self.failed_handshakes = 0  # connections without CURVE, or expecting another trainer's key
        self._auth = self._monitor = None
        self._since_note = 0
        self._next_note = 0.0

    def start(self, socket) -> None:
        import zmq
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self.context, log=self.log.getChild("zap"))
        self._auth.start()
        # The ZAP handler answers for this socket's domain only; it runs before bind(), so no connection is
        # ever accepted without it (libzmq lets CURVE through unchecked when no handler is there at all).
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.allowlist)
        socket.zap_domain = ZAP_DOMAIN.encode()
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        socket.curve_server = True
        # The ZAP handler sees (and reports) wrong keys; a peer that fails the handshake before that, such as a
        # producer without CURVE, shows only as a socket event.
        self._monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    @property
    def denied(self) -> int:
        return self.allowlist.denied

    def note_failed_handshakes(self) -> None:
        """Count and (at most every DENIED_NOTE_S) report handshakes that failed; call from the socket's thread."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor is not None and self._monitor.poll(0):
            recv_monitor_message(self._monitor)
            self.failed_handshakes += 1
            self._since_note += 1
        now = time.monotonic()
        if self._since_note and now >= self._next_note:
            self.log.warning("stream: refused %d connection(s) (%d in all) that failed the CURVE handshake: a "
                             "producer without --curve_secret_key/--curve_server_key, or with another trainer's "
                             "public key", self._since_note, self.failed_handshakes)
            self._since_note, self._next_note = 0, now + DENIED_NOTE_S

    def stop(self) -> None:
        """After the socket is closed: a socket left without its handler would admit any CURVE key."""
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


# --- bertstream-keys -------------------------------------------------------------------------------------


def create_key_pair(directory: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """NAME.key (mode 0644) and NAME.key_secret (0600) in `directory` (created 0700 if missing)."""
    from zmq.auth import create_certificates

    if not _NAME.match(name):
        raise KeyFileError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a file name)")
    directory = Path(directory).expanduser()
    public, secret = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{' and '.join(existing)} already exist(s); keep them, or pass --force to replace "
                           "them (producers and trainers using the old keys will be refused)")
    for path in (public, secret):
        if path.exists():
            path.unlink()  # a fresh file: an old one's permissions must not carry over to the new secret
    old_umask = os.umask(0o077)  # the secret file is owner-only from its first byte
    try:
        if not directory.is_dir():
            directory.mkdir(mode=0o700, parents=True)
        create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertstream-keys",
        description="Create CURVE key pairs for a trainer and its producers on other hosts: NAME.key (public, "
        "to hand out) and NAME.key_secret (secret, readable by its owner only).",
        epilog="Then: the trainer gets --curve_secret_key DIR/trainer.key_secret and --curve_authorized_keys "
        "PRODUCER_KEYS_DIR (a folder holding the producers' .key files); each producer gets --curve_secret_key "
        "DIR/NAME.key_secret and --curve_server_key DIR/trainer.key.")
    parser.add_argument("directory", metavar="DIR", help="where the key files are written (created 0700 if missing)")
    parser.add_argument("--name", action="append", default=None, metavar="NAME",
                        help="one key pair per --name (repeatable; default: trainer and producer)")
    parser.add_argument("--force", action="store_true", help="replace existing key files of the same name")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.name or list(DEFAULT_NAMES)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        parser.error(f"--name given twice: {', '.join(duplicates)}")
    for name in names:
        if not _NAME.match(name):
            parser.error(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a file name)")
    directory = Path(args.directory)
    try:
        if not args.force:  # all or nothing: check every name before writing any
            for name in names:
                for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
                    if (directory / f"{name}{suffix}").exists():
                        raise KeyFileError(f"{directory / (name + suffix)} already exists; keep it, or pass "
                                           "--force to replace it (whoever uses the old key will be refused)")
        for name in names:
            public, secret = create_key_pair(directory, name, args.force)
            print(f"{name}: public {public} (hand out), secret {secret} (mode 0600, keep on its host)")
    except (KeyFileError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
