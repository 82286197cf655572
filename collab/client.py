"""A small client of the collaborative service (standard library only, Python 3.6+).

    python -m collab.client http://HOST:8080 shirt.png boot.jpg     # one JSON answer a line, one connection
    python -m collab.client http://HOST:8080 --health
    python -m collab.client http://HOST:8080 --token-file service.token shirt.png   # a service with --token-file

    from collab.client import Client, predict, health
    answer = predict('http://HOST:8080', 'shirt.png')   # {'top': [{'class', 'name', 'probability'}], 'devices': ...}
    with Client('http://HOST:8080') as c:               # many requests over one kept-alive connection
        answers = [c.predict(path) for path in paths]

The same with curl: ``curl -s --data-binary @shirt.png http://HOST:8080/predict``.
"""
import argparse
import http.client
import json
import sys
import urllib.parse


class ServiceError(RuntimeError):
    """The service answered with an error (status and its one-line message), or could not be reached."""

    def __init__(self, status, message):
        super().__init__(f'HTTP {status}: {message}' if status else message)
        self.status = status


class Client:
    """Requests to the service at `url` over one HTTP/1.1 connection, kept alive between them (no connection set-up
    per request). A connection the service closed while idle is opened again once, transparently."""

    def __init__(self, url, timeout=60.0, token=None):
        parts = urllib.parse.urlsplit(url if '//' in url else 'http://' + url)
        if parts.scheme != 'http' or not parts.hostname:
            raise ValueError(f'the service URL must be http://HOST:PORT, got {url!r}')
        self.url, self.timeout = url.rstrip('/'), timeout
        self.host, self.port, self.prefix = parts.hostname, parts.port or 80, parts.path.rstrip('/')
        self.conn = None
        self.token = token

    def predict(self, image, topk=None):
        """Classify `image` (a file path or the bytes of a PNG/JPEG); the answer as a dict."""
        if isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            with open(image, 'rb') as f:
                data = f.read()
        query = f'?topk={int(topk)}' if topk else ''
        return self._call('POST', '/predict' + query, data)

    def health(self):
        """The service's /health: each device's state, last latency and model (its models, hosts and pids only with
        the token). Answered also when the service is not ready (503: no device can answer): see 'ready'."""
        return self._call('GET', '/health', ok=(503,))

    def _call(self, method, path, body=None, ok=()):
        headers = {'Content-Type': 'application/octet-stream'} if body is not None else {}
        if self.token:
            headers['Authorization'] = 'Bearer ' + self.token
        for attempt in (0, 1):
            reused = self.conn is not None
            if not reused:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, self.prefix + path, body=body, headers=headers)
                response = self.conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as err:
                self.close()
                # RemoteDisconnected is a ConnectionResetError: the kept connection had been closed by the service
                if reused and attempt == 0 and isinstance(err, (ConnectionResetError, BrokenPipeError)):
                    continue
                raise ServiceError(None, f'cannot reach {self.url}: {err}') from None
            if response.will_close:
                self.close()
            try:
                answer = json.loads(payload.decode('utf-8'))
            except ValueError:
                answer = {'error': response.reason}
            if response.status >= 400 and response.status not in ok:
                raise ServiceError(response.status, answer.get('error', response.reason))
            return answer

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def predict(url, image, topk=None, timeout=60.0, token=None):
    """Classify `image` (a file path or the bytes of a PNG/JPEG) with the service at `url`; the answer as a dict."""
    with Client(url, timeout, token) as c:
        return c.predict(image, topk)


def health(url, timeout=10.0, token=None):
    """The service's /health: each device's state, last latency and model."""
    with Client(url, timeout, token) as c:
        return c.health()


def read_token(path):
    """The first token of a --token-file (python -m collab.keys token FILE)."""
    with open(path, encoding='utf-8') as f:
        for line in f:
            if line.strip() and not line.startswith('#'):
                return line.strip()
    raise ValueError(f'the token file {path} holds no token')


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m collab.client', description=__doc__.split('\n')[0])
    p.add_argument('url', help='the service, e.g. http://localhost:8080')
    p.add_argument('images', nargs='*', help='PNG or JPEG files to classify')
    p.add_argument('--health', action='store_true', help="print the service's /health")
    p.add_argument('--topk', type=int, default=None)
    p.add_argument('--timeout', type=float, default=60.0)
    p.add_argument('--token-file', default=None, help="the service's token (its --token-file)")
    args = p.parse_args(argv)
    if not args.images and not args.health:
        p.error('give image files, or --health')
    code = 0
    try:
        token = read_token(args.token_file) if args.token_file else None
        client = Client(args.url, args.timeout, token)
    except OSError as err:
        p.error(f'cannot read {args.token_file}: {err.strerror or err}')
    except ValueError as err:
        p.error(str(err))
    try:
        if args.health:
            print(json.dumps(client.health(), indent=1))
        for path in args.images:
            try:
                print(json.dumps(dict(client.predict(path, args.topk), file=path)))
            except ServiceError as err:
                if err.status is None:
                    raise
                print(f'error: {path}: {err}', file=sys.stderr)
                code = 1
            except OSError as err:
                print(f'error: cannot read {path}: {err.strerror or err}', file=sys.stderr)
                code = 1
    except ServiceError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    finally:
        client.close()
    return code


if __name__ == '__main__':
    sys.exit(main())
