"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, --grpc-port), with the generated
service modules tritonclient ships, so that `tritonclient.grpc.InferenceServerClient` works unchanged.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer (inputs as raw_input_contents
or as typed `contents`; outputs as raw_output_contents). With --token-file every call but ServerLive and
ServerReady needs the metadata `authorization: Bearer TOKEN` (UNAUTHENTICATED otherwise), as over HTTP.
"""
import concurrent.futures
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from collab.keys import token_ok

from . import oip
from .service import Refused

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 401: grpc.StatusCode.UNAUTHENTICATED,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
HTTP = {grpc.StatusCode.OK: 200, **{v: k for k, v in CODES.items()}}


def _param(p):
    """The value of an InferParameter (whichever field is set), or None."""
    which = p.WhichOneof('parameter_choice')
    return getattr(p, which) if which else None


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: oip.Model, metrics, tokens=None):
        self.model, self.metrics, self.tokens = model, metrics, tokens

    def _call(self, name, context, fn, probe=False):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if not probe and self.tokens is not None:
                given = dict(context.invocation_metadata()).get('authorization', '')
                if not (given.startswith('Bearer ') and token_ok(given[7:].strip().encode(), self.tokens)):
                    self.metrics.unauthorised.labels('grpc').inc()
                    raise Refused(401, 'this service needs a token: metadata authorization: Bearer TOKEN')
            return fn()
        except Refused as err:
            code = CODES.get(err.status, grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(err))
        finally:
            self.metrics.observe(f'grpc:{name}', HTTP.get(code, 500), time.perf_counter() - t0)

    def ServerLive(self, request, context):
        return self._call('ServerLive', context, lambda: service_pb2.ServerLiveResponse(live=True), probe=True)

    def ServerReady(self, request, context):
        return self._call('ServerReady', context,
                          lambda: service_pb2.ServerReadyResponse(ready=self.model.service.ready()), probe=True)

    def ModelReady(self, request, context):
        def ready():
            self.model.check(request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=self.model.service.ready())
        return self._call('ModelReady', context, ready)

    def ServerMetadata(self, request, context):
        def meta():
            m = self.model.server_metadata()
            return service_pb2.ServerMetadataResponse(name=m['name'], version=m['version'], extensions=m['extensions'])
        return self._call('ServerMetadata', context, meta)

    def ModelMetadata(self, request, context):
        def meta():
            self.model.check(request.name, request.version)
            m = self.model.metadata()
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=m['name'], versions=m['versions'], platform=m['platform'],
                inputs=[tensor(name=t['name'], datatype=t['datatype'], shape=t['shape']) for t in m['inputs']],
                outputs=[tensor(name=t['name'], datatype=t['datatype'], shape=t['shape']) for t in m['outputs']])
        return self._call('ModelMetadata', context, meta)

    def ModelInfer(self, request, context):
        return self._call('ModelInfer', context, lambda: self._infer(request))

    def _infer(self, request):
        model = self.model
        model.check(request.model_name, request.model_version)
        if len(request.inputs) != 1 or request.inputs[0].name != oip.INPUT:
            raise Refused(400, f'the request must hold one input, {oip.INPUT!r}')
        inp = request.inputs[0]
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise Refused(400, 'one raw_input_contents entry is expected, for the one input')
            x = model.images(inp.datatype, list(inp.shape), raw=request.raw_input_contents[0])
        else:
            field = {'UINT8': 'uint_contents', 'FP32': 'fp32_contents'}.get(inp.datatype)
            data = list(getattr(inp.contents, field)) if field else []
            x = model.images(inp.datatype, list(inp.shape), data=data)
        if not model.service.ready():
            raise Refused(503, 'the ensemble cannot answer now: no device up')
        asked = []
        for o in request.outputs:
            k = _param(o.parameters['classification']) if 'classification' in o.parameters else 0
            if not isinstance(k, int) or isinstance(k, bool):
                raise Refused(400, 'classification must be an integer')
            asked.append((o.name, k))
        tensors, extra = model.run(x, asked)
        response = service_pb2.ModelInferResponse(model_name=model.name, model_version=oip.VERSION, id=request.id)
        response.parameters['devices'].string_param = ','.join(str(d) for d in extra['devices'])
        response.parameters['batch'].int64_param = extra['batch']
        for name, dtype, shape, values in tensors:
            response.outputs.add(name=name, datatype=dtype, shape=shape)
            response.raw_output_contents.append(
                oip.bytes_tensor(values) if dtype == 'BYTES' else np.ascontiguousarray(values, '<f4').tobytes())
        return response


def start_grpc(model: oip.Model, metrics, args, tokens=None):
    """A started grpc.Server on args.host:args.grpc_port."""
    limit = int(args.max_body_mb * 1024 * 1024)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=min(args.max_inflight, 32),
                                                               thread_name_prefix='grpc'),
                         options=[('grpc.max_receive_message_length', limit),
                                  ('grpc.max_send_message_length', limit),
                                  ('grpc.so_reuseport', 0)],
                         maximum_concurrent_rpcs=args.max_inflight)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(model, metrics, tokens), server)
    host = f'[{args.host}]' if ':' in args.host else args.host
    try:
        port = server.add_insecure_port(f'{host}:{args.grpc_port}')
    except RuntimeError:
        port = 0
    if not port:
        raise RuntimeError(f'cannot serve gRPC on {args.host}:{args.grpc_port}')
    server.start()
    return server
