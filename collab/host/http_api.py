"""The service's HTTP API (FastAPI, served by uvicorn from collab/host/server.py).

    POST /predict?topk=K                     a PNG or JPEG file as the body, or a multipart form's `file`
                                             -> {"top": [{"class", "name", "probability"}], "logits", "devices",
                                                 "missing", "batch", "latency_ms", "request"}
    GET  /health                             200 when the ensemble can answer, else 503 (devices' states; their
                                             models, hosts and pids only with the token)
    GET  /v2/health/live, /v2/health/ready   the Open Inference Protocol's probes (collab/host/oip.py)
    GET  /v2, /v2/models/NAME[/versions/1]   server and model metadata
    GET  /v2/models/NAME[/versions/1]/ready
    POST /v2/models/NAME[/versions/1]/infer  JSON, or Triton's binary tensor extension
    GET  /metrics                            Prometheus text (collab/host/metrics.py)
    GET  /openapi.json, /docs                this API, machine-readable

Every error is JSON, {"error": "..."}. With --token-file every endpoint but the three probes needs
`Authorization: Bearer TOKEN` (401 otherwise). Each request gets an X-Request-Id (the caller's, or a new one) and one
log line on the logger 'devit.service' (probes at DEBUG).
"""
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from collab.keys import token_ok

from . import oip
from .service import Refused

LOG = logging.getLogger('devit.service')
PROBES = ('/health', '/v2/health/live', '/v2/health/ready')
QUIET = PROBES + ('/metrics',)

IMAGE_BODY = {'requestBody': {'required': True, 'content': {
    'image/png': {'schema': {'type': 'string', 'format': 'binary'}},
    'image/jpeg': {'schema': {'type': 'string', 'format': 'binary'}},
    'application/octet-stream': {'schema': {'type': 'string', 'format': 'binary'}},
    'multipart/form-data': {'schema': {'type': 'object', 'required': ['file'],
                                       'properties': {'file': {'type': 'string', 'format': 'binary'}}}}}}}
TENSOR = {'type': 'object', 'required': ['name', 'datatype', 'shape'], 'properties': {
    'name': {'type': 'string'}, 'datatype': {'type': 'string', 'enum': ['UINT8', 'FP32']},
    'shape': {'type': 'array', 'items': {'type': 'integer'}}, 'parameters': {'type': 'object'},
    'data': {'type': 'array', 'items': {'type': 'number'}}}}
INFER_BODY = {'requestBody': {'required': True, 'content': {
    'application/json': {'schema': {'type': 'object', 'required': ['inputs'], 'properties': {
        'id': {'type': 'string'}, 'parameters': {'type': 'object'},
        'inputs': {'type': 'array', 'items': TENSOR},
        'outputs': {'type': 'array', 'items': {'type': 'object', 'properties': {
            'name': {'type': 'string'}, 'parameters': {'type': 'object'}}}}}}},
    'application/octet-stream': {'schema': {'type': 'string', 'format': 'binary'}}}}}


def path_parameters(*names: str) -> dict:
    """The OpenAPI description of a route's path parameters, for the routes that read them from the request's
    path_params themselves (FastAPI's solving of parameters costs about 50 µs a request)."""
    return {'parameters': [{'name': n, 'in': 'path', 'required': True, 'schema': {'type': 'string'}} for n in names]}


TOPK = {'parameters': [{'name': 'topk', 'in': 'query', 'required': False,
                        'schema': {'type': 'integer', 'minimum': 1, 'maximum': 1000}}]}


def topk_of(request: Request) -> int | None:
    """?topk=K, 1..1000 (None when absent)."""
    raw = request.query_params.get('topk')
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 1000):
        raise Refused(400, f'topk must be a whole number in 1..1000, got {raw[:20]!r}')
    return int(raw)


def error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({'error': message}, status, headers=headers)


def build_app(service, model: oip.Model, metrics, args, tokens=None) -> FastAPI:
    """The FastAPI application around `service`; `tokens` (bytes) when a --token-file is given."""
    max_body = int(args.max_body_mb * 1024 * 1024)

    # inference is awaited on the event loop; what takes long (a big image's decoding, a long JSON tensor) runs here
    pool = concurrent.futures.ThreadPoolExecutor(args.max_inflight + 8, thread_name_prefix='http-work')

    async def blocking(fn, *a):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *a)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.dispatcher.attach(asyncio.get_running_loop())  # requests turn the dispatcher on this loop
        try:
            yield
        finally:
            service.dispatcher.detach()  # (the gRPC front end and the workers' goodbyes still need it)
            pool.shutdown(wait=False)

    app = FastAPI(title='DeViT collaborative inference', version='1', lifespan=lifespan,
                  telemetry={'tracing': False, 'metrics': False, 'logs': False},  # (its own metrics and log lines)
                  description='The ensemble of the devices as an Open Inference Protocol model, and /predict.')
    state = {'inflight': 0, 'requests': 0}

    def authorised(headers) -> bool:
        if tokens is None:
            return True
        given = headers.get('authorization', '')
        return given.startswith('Bearer ') and token_ok(given[7:].strip().encode(), tokens)

    def frame(inner):
        """Every request, as plain ASGI (Starlette's BaseHTTPMiddleware runs each in a task of its own, with its
        body and answer through memory streams): the token, --max-inflight, the X-Request-Id header, the metrics
        and the log line."""
        async def app_(scope, receive, send):
            if scope['type'] != 'http':
                return await inner(scope, receive, send)
            t0 = time.perf_counter()
            headers = Headers(scope=scope)
            rid = headers.get('x-request-id') or uuid.uuid4().hex
            if len(rid) > 128 or not rid.isprintable():
                rid = uuid.uuid4().hex
            path = scope['path']
            counted = path not in QUIET
            status = [500]

            async def send_(message):
                if message['type'] == 'http.response.start':
                    status[0] = message['status']
                    message['headers'] = list(message.get('headers', [])) + [(b'x-request-id', rid.encode())]
                await send(message)
            try:
                if path not in PROBES and not authorised(headers):
                    metrics.unauthorised.labels('http').inc()
                    await error(401, 'this service needs a token: Authorization: Bearer TOKEN',
                                {'WWW-Authenticate': 'Bearer'})(scope, receive, send_)
                elif counted and state['inflight'] >= args.max_inflight:
                    await error(503, f'the service is answering {args.max_inflight} requests (--max-inflight): '
                                     'try again shortly', {'Retry-After': '1'})(scope, receive, send_)
                elif counted:
                    state['inflight'] += 1
                    state['requests'] += 1
                    metrics.inflight.inc()
                    try:
                        await inner(scope, receive, send_)
                    finally:
                        state['inflight'] -= 1
                        metrics.inflight.dec()
                else:
                    await inner(scope, receive, send_)
            finally:
                seconds = time.perf_counter() - t0
                endpoint = getattr(scope.get('route'), 'path', None) or 'other'
                metrics.observe(endpoint, status[0], seconds)
                LOG.log(logging.DEBUG if path in QUIET else logging.INFO, json.dumps({
                    'time': time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime()), 'request_id': rid,
                    'method': scope['method'], 'path': path, 'status': status[0],
                    'latency_ms': round(seconds * 1e3, 3), 'devices': scope.get('devit.devices')}))
        return app_
    app.add_middleware(frame)

    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        close = {'Connection': 'close'} if exc.status in (408, 413) else None
        return error(exc.status, str(exc), close)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f'no such endpoint {request.url.path} (GET /openapi.json lists them)'
        elif exc.status_code == 405:
            detail = f'{request.method} is not allowed on {request.url.path}'
        return error(exc.status_code, detail, getattr(exc, 'headers', None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        parts = ['{}: {}'.format('.'.join(str(p) for p in e.get('loc', ())), e.get('msg')) for e in exc.errors()]
        return error(400, '; '.join(parts) or 'invalid request')

    async def body_of(request: Request) -> bytes:
        """The body, at most --max-body-mb (413), read within --body-timeout-s (408)."""
        length = request.headers.get('content-length')
        if length is not None:
            if not length.isdigit():
                raise Refused(400, f'Content-Length must be a number of bytes, got {length!r}')
            if int(length) > max_body:
                raise Refused(413, f'the body is {length} bytes; at most {max_body} are taken (--max-body-mb)')
        chunks, total = [], 0

        async def pull():
            nonlocal total
            async for chunk in request.stream():
                total += len(chunk)
                if total > max_body:
                    raise Refused(413, f'the body is over {max_body} bytes (--max-body-mb)')
                chunks.append(chunk)
        try:
            async with asyncio.timeout(args.body_timeout_s):  # (wait_for would start a task of its own)
                await pull()
        except TimeoutError:
            raise Refused(408, f'the body did not arrive within {args.body_timeout_s:g} s (--body-timeout-s): '
                               f'{total} of {length or "?"} bytes') from None
        return b''.join(chunks)

    async def image_of(request: Request) -> bytes:
        body = await body_of(request)
        if request.headers.get('content-type', '').startswith('multipart/form-data'):
            async def stream():
                yield body
            try:
                form = await MultiPartParser(request.headers, stream()).parse()
            except MultiPartException as err:
                raise Refused(400, f'the multipart form cannot be read: {err.message}') from None
            part = form.get('file')
            if part is None or isinstance(part, str):
                raise Refused(400, 'the multipart form has no file field "file"')
            body = await part.read()
        return body

    # (the routes are matched in turn: the two that carry the traffic first)
    @app.post('/predict', openapi_extra=IMAGE_BODY | TOPK, summary='Classify one PNG or JPEG image')
    async def predict(request: Request):
        topk = topk_of(request)
        body = await image_of(request)
        answer = await service.predict(body, topk, blocking)
        request.scope['devit.devices'] = answer['devices']
        return JSONResponse(answer)  # (a dict returned would go through FastAPI's jsonable_encoder first)

    @app.post('/v2/models/{name}/infer', openapi_extra=INFER_BODY | path_parameters('name'), summary='OIP: infer')
    @app.post('/v2/models/{name}/versions/{version}/infer', summary='OIP: infer',
              openapi_extra=INFER_BODY | path_parameters('name', 'version'))
    async def infer(request: Request):
        path = request.path_params
        model.check(path['name'], path.get('version'))
        body = await body_of(request)
        req, tail = oip.parse_request(body, request.headers.get('inference-header-content-length'))
        if not service.ready():
            raise Refused(503, 'the ensemble cannot answer now: no device up (GET /health)')
        answer, blob = await oip.infer_json(model, req, tail, blocking)
        request.scope['devit.devices'] = answer['parameters']['devices']
        if not blob:
            return JSONResponse(answer)
        head = json.dumps(answer).encode()
        return Response(head + blob, media_type='application/octet-stream',
                        headers={'Inference-Header-Content-Length': str(len(head))})

    @app.get('/health', summary='The devices and whether the ensemble can answer (503 when not)')
    async def health(request: Request):
        h = service.health(authorised(request.headers))
        return JSONResponse(h, 200 if h['ready'] else 503)

    @app.get('/v2/health/live', summary='OIP: the server is live')
    async def live():
        return {'live': True}

    @app.get('/v2/health/ready', summary='OIP: the model can answer (503 when not)')
    async def ready():
        ok = service.ready()
        return JSONResponse({'ready': ok}, 200 if ok else 503)

    @app.get('/v2', summary='OIP: server metadata')
    async def server_metadata():
        return model.server_metadata()

    @app.get('/v2/models/{name}', summary='OIP: model metadata')
    @app.get('/v2/models/{name}/versions/{version}', summary='OIP: model metadata')
    async def model_metadata(name: str, version: str | None = None):
        model.check(name, version)
        return model.metadata()

    @app.get('/v2/models/{name}/ready', summary='OIP: model readiness')
    @app.get('/v2/models/{name}/versions/{version}/ready', summary='OIP: model readiness')
    async def model_ready(name: str, version: str | None = None):
        model.check(name, version)
        ok = service.ready()
        return JSONResponse({'name': name, 'ready': ok}, 200 if ok else 503)

    @app.get('/metrics', summary='Prometheus metrics')
    async def prometheus():
        text, kind = metrics.text()
        return Response(text, media_type=kind)

    app.state.counts = state
    return app
