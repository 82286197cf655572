"""The fleet's keys: CURVE certificates for the aggregator and each device, the service's token, and who may bind where.

    python -m collab.keys init DIR --devices N    # aggregator.key(_secret), device0..N-1.key(_secret)
    python -m collab.keys add DIR --device I      # (re)issue device I's pair: a replaced board
    python -m collab.keys token FILE              # a random bearer token for the HTTP/gRPC service
    python -m collab.keys list DIR                # which devices hold a key

The files are pyzmq's own certificate format (`zmq.auth.create_certificates`): NAME.key holds the public key,
NAME.key_secret both; secret files are written mode 0600 and refused when group or others can read them, as ssh
refuses a private key. The aggregator needs DIR whole (its secret, every device's public key); a board needs only
its own `deviceI.key_secret` and `aggregator.key`. Removing `deviceI.key` from the aggregator's DIR revokes that
board at the aggregator's next start.

Without keys the runtime is for one machine: the aggregator and the service bind 127.0.0.1 only, and binding any
other address needs --insecure (`check_bind`).

Device-side module: Python 3.6+, pyzmq.
"""
import argparse
import hmac
import os
import re
import secrets
import stat
import sys

import zmq
import zmq.auth
import zmq.auth.thread
import zmq.utils.z85

from . import logs

AGGREGATOR = 'aggregator'
DOMAIN = 'devit'
LOOPBACK = ('127.0.0.1', 'localhost', '::1', '[::1]')
TOKEN_MIN_CHARS = 16


class KeyFileError(ValueError):
    """A key or token file that is missing, malformed or readable by others (one line: which file, what to do)."""


def device_name(index):
    return f'device{index}'


def check_curve():
    if not zmq.has('curve'):
        raise KeyFileError('this pyzmq/libzmq has no CURVE security (zmq.has("curve") is False): install a pyzmq wheel '
                        'that bundles libzmq (pip install pyzmq)')


def check_private(path, what='secret key'):
    """Refuse a secret file that group or others may read (one line naming it and the fix)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise KeyFileError(f'cannot read the {what} {path}: {err.strerror or err}') from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f'the {what} {path} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 {path}')


def _load(path, secret):
    check_curve()
    if secret:
        check_private(path)
    elif not os.path.isfile(path):
        raise KeyFileError(f'no public key {path} (python -m collab.keys init/add writes it)')
    try:
        public, private = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise KeyFileError(f'{path} is not a CURVE certificate: {err}') from None
    if secret and not private:
        raise KeyFileError(f'{path} holds no secret key (the NAME.key_secret file is the one to give)')
    return public, private


def aggregator_pair(keys_dir):
    """(public, secret) of the aggregator, from DIR/aggregator.key_secret."""
    return _load(os.path.join(keys_dir, AGGREGATOR + '.key_secret'), True)


def aggregator_public(keys_dir):
    return _load(os.path.join(keys_dir, AGGREGATOR + '.key'), False)[0]


def device_pair(keys_dir, index):
    """(public, secret) of device `index`, from DIR/deviceI.key_secret (all a board holds, with aggregator.key)."""
    return _load(os.path.join(keys_dir, device_name(index) + '.key_secret'), True)


def device_publics(keys_dir, num_devices=None):
    """{z85 public key (bytes): device index} of every deviceI.key in DIR (the fleet the aggregator admits)."""
    found = {}
    for name in sorted(os.listdir(keys_dir)):
        m = re.fullmatch(r'device(\d+)\.key', name)
        if m and (num_devices is None or int(m.group(1)) < num_devices):
            found[_load(os.path.join(keys_dir, name), False)[0]] = int(m.group(1))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Sockets

def server(sock, public, secret):
    """Make `sock` (before bind) a CURVE server whose peers are checked by the ZAP handler of its context."""
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    sock.zap_domain = DOMAIN.encode()


def client(sock, public, secret, server_public):
    """Make `sock` (before connect) a CURVE client that only talks to the server holding `server_public`."""
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_public


def user_device(frame):
    """The device index the ZAP handler bound to the peer that sent `frame` (None: no CURVE, or not a device)."""
    try:
        user = frame.get('User-Id')
    except (AttributeError, zmq.ZMQError):
        return None
    m = re.fullmatch(r'device(\d+)', user or '')
    return int(m.group(1)) if m else None


class Authenticator(zmq.auth.thread.ThreadAuthenticator):
    """ZAP for one CURVE server socket: admits the public keys of `allowed` ({z85 key: device index}), names each
    admitted peer 'deviceI' (its frames' User-Id), counts the others and logs each address once a minute."""

    def __init__(self, ctx, allowed, log):
        super().__init__(ctx)
        self.allowed, self.say = dict(allowed), log
        self.refused = 0
        self._address, self._say_once = '?', logs.Throttled(log)  # a refused address: once a minute

    def begin(self):
        self.start()
        self.configure_curve_callback(DOMAIN, credentials_provider=self)
        return self

    def handle_zap_message(self, msg):  # (a coroutine in pyzmq >= 25, a plain call before: returned either way)
        self._address = msg[3].decode('utf-8', 'replace') if len(msg) > 3 else '?'
        return super().handle_zap_message(msg)

    def callback(self, domain, key):
        if key in self.allowed:
            return True
        self.refused += 1
        self._say_once(self._address, f'refused a connection from {self._address}: its key is not one of this '
                                      f'fleet\'s devices ({self.refused} refused so far; logged once a minute per '
                                      'address)')
        return False

    def curve_user_id(self, client_public_key):
        key = zmq.utils.z85.encode(client_public_key)
        return device_name(self.allowed[key]) if key in self.allowed else 'unknown'


# ---------------------------------------------------------------------------------------------------------------
# Binding and the service's token

def is_loopback(host):
    return host in LOOPBACK or host.startswith('127.')


def check_bind(host, keys, insecure, what):
    """The line to print before `what` listens at `host` (None with keys): a note for a local, unauthenticated run,
    a warning when --insecure lets it listen beyond loopback. Beyond loopback with neither: KeyFileError."""
    if keys:
        return None
    if is_loopback(host):
        return (f'{what} binds {host} only: the fleet is unauthenticated and local (--keys DIR for devices on '
                'other hosts)')
    if not insecure:
        raise KeyFileError(f'{what} would listen on {host} without keys: anyone on that network could join or call '
                           'it. Give --keys DIR (python -m collab.keys init) or, on a network you trust, --insecure')
    return f'warning: {what} listens on {host} with no authentication and no encryption (--insecure)'


def read_tokens(path):
    """The tokens of a --token-file (one a line, at least 16 printable characters each, the file mode 0600)."""
    check_private(path, 'token file')
    with open(path, encoding='utf-8') as f:
        tokens = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    if not tokens:
        raise KeyFileError(f'the token file {path} holds no token')
    for t in tokens:
        if len(t) < TOKEN_MIN_CHARS or not t.isprintable() or ' ' in t:
            raise KeyFileError(f'a token in {path} is shorter than {TOKEN_MIN_CHARS} characters or holds spaces: '
                               'python -m collab.keys '
                            'token FILE writes a good one')
    return [t.encode() for t in tokens]


def token_ok(given, tokens):
    """Whether `given` (bytes) is one of `tokens`, compared in constant time."""
    return any(hmac.compare_digest(given, t) for t in tokens)


# ---------------------------------------------------------------------------------------------------------------
# Writing keys

def _write_pair(keys_dir, name):
    for suffix in ('.key', '.key_secret'):
        path = os.path.join(keys_dir, name + suffix)
        if os.path.exists(path):
            os.remove(path)
    public, secret = zmq.auth.create_certificates(keys_dir, name)
    os.chmod(secret, 0o600)
    return public, secret


def init(keys_dir, devices, force=False):
    check_curve()
    if os.path.exists(os.path.join(keys_dir, AGGREGATOR + '.key_secret')) and not force:
        raise KeyFileError(f'{keys_dir} already holds an aggregator key: every board would need new keys; give '
                           '--force to '
                        'replace them all, or `add` to reissue one device')
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    written = [_write_pair(keys_dir, AGGREGATOR)]
    written += [_write_pair(keys_dir, device_name(i)) for i in range(devices)]
    return written


def add(keys_dir, index):
    check_curve()
    if not os.path.exists(os.path.join(keys_dir, AGGREGATOR + '.key')):
        raise KeyFileError(f'{keys_dir} holds no aggregator key: run python -m collab.keys init {keys_dir} '
                           '--devices N first')
    return _write_pair(keys_dir, device_name(index))


def write_token(path):
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(token + '\n')
    os.chmod(path, 0o600)
    return token


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m collab.keys', description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='command')
    q = sub.add_parser('init', help='write the aggregator\'s pair and one per device')
    q.add_argument('dir')
    q.add_argument('--devices', type=int, required=True)
    q.add_argument('--force', action='store_true', help='replace existing keys')
    q = sub.add_parser('add', help="(re)issue one device's pair")
    q.add_argument('dir')
    q.add_argument('--device', type=int, required=True)
    q = sub.add_parser('token', help='write a random bearer token (mode 0600)')
    q.add_argument('file')
    q = sub.add_parser('list', help='the devices that hold a key')
    q.add_argument('dir')
    args = p.parse_args(argv)
    if args.command is None:
        p.error('choose a command: init, add, token or list')
    try:
        if args.command == 'init':
            if args.devices < 1:
                p.error('--devices must be at least 1')
            for public, secret in init(args.dir, args.devices, args.force):
                print(f'wrote {public} and {secret}')
            print('a board needs its deviceI.key_secret and aggregator.key (docs/security.md)')
        elif args.command == 'add':
            public, secret = add(args.dir, args.device)
            print('wrote {} and {}: copy {} and {} to the board'.format(
                public, secret, secret, os.path.join(args.dir, AGGREGATOR + '.key')))
        elif args.command == 'token':
            write_token(args.file)
            print(f'wrote a token to {args.file} (mode 0600): clients send "Authorization: Bearer $(cat {args.file})"')
        else:
            for key, index in sorted(device_publics(args.dir).items(), key=lambda kv: kv[1]):
                print(f'{device_name(index)} {key.decode()}')
    except (KeyFileError, OSError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
