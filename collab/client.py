"""A small client of the collaborative service (standard library only, Python 3.6+).

    python -m collab.client http://HOST:8080 shirt.png boot.jpg     # one JSON answer a line
    python -m collab.client http://HOST:8080 --health

    from collab.client import predict, health
    answer = predict('http://HOST:8080', 'shirt.png')   # {'top': [{'class', 'name', 'probability'}], 'devices': ...}

The same with curl: ``curl -s --data-binary @shirt.png http://HOST:8080/predict``.
"""
import argparse
import json
import sys
import urllib.error
import urllib.request


class ServiceError(RuntimeError):
    """The service answered with an error (status and its one-line message), or could not be reached."""

    def __init__(self, status, message):
        super().__init__(f'HTTP {status}: {message}' if status else message)
        self.status = status


def _call(request, timeout):
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read().decode('utf-8'))
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read().decode('utf-8')).get('error', err.reason)
        except ValueError:
            message = err.reason
        raise ServiceError(err.code, message) from None
    except (urllib.error.URLError, OSError) as err:
        raise ServiceError(None, f'cannot reach {request.full_url}: {getattr(err, "reason", err)}') from None


def predict(url, image, topk=None, timeout=60.0):
    """Classify `image` (a file path or the bytes of a PNG/JPEG) with the service at `url`; the answer as a dict."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        with open(image, 'rb') as f:
            data = f.read()
    query = f'?topk={int(topk)}' if topk else ''
    request = urllib.request.Request(url.rstrip('/') + '/predict' + query, data=data, method='POST',
                                     headers={'Content-Type': 'application/octet-stream'})
    return _call(request, timeout)


def health(url, timeout=10.0):
    """The service's /health: each device's state, last latency and model."""
    return _call(urllib.request.Request(url.rstrip('/') + '/health'), timeout)


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m collab.client', description=__doc__.split('\n')[0])
    p.add_argument('url', help='the service, e.g. http://localhost:8080')
    p.add_argument('images', nargs='*', help='PNG or JPEG files to classify')
    p.add_argument('--health', action='store_true', help="print the service's /health")
    p.add_argument('--topk', type=int, default=None)
    p.add_argument('--timeout', type=float, default=60.0)
    args = p.parse_args(argv)
    if not args.images and not args.health:
        p.error('give image files, or --health')
    code = 0
    try:
        if args.health:
            print(json.dumps(health(args.url, args.timeout), indent=1))
        for path in args.images:
            try:
                print(json.dumps(dict(predict(args.url, path, args.topk, args.timeout), file=path)))
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
    return code


if __name__ == '__main__':
    sys.exit(main())
