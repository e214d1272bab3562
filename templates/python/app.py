"""A gpuwasm handler in Python: every request runs in a fresh instance of
this component (built by componentize-py). Build it with `gpuwasm build`,
try it with `gpuwasm run`, deploy it with `gpuwasm deploy`."""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = request.path_with_query() or "/"
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as stream:
            stream.blocking_write_and_flush(f"hello from {{name}}, you asked for {path}\n".encode())
        OutgoingBody.finish(body, None)
