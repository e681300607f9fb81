"""The simplest grpc.aio pass-through proxies: the floor any Python gRPC proxy is measured against.

    python -m loadtest.floor_proxy LISTEN UPSTREAM [--uvloop] [--transparent]

Plain: unary calls, bytes in and bytes out, nothing else. ``--transparent`` adds only what a transparent proxy
cannot skip: the client's metadata and remaining deadline go upstream, the upstream's initial metadata, status,
details and trailing metadata come back. SIGINT and SIGTERM stop it cleanly.
"""

import asyncio
import signal
import sys

import grpc


def plain(stub):
    async def forward(request, context):
        return await stub(request)

    return forward


def transparent(stub):
    async def forward(request, context):
        call = stub(request, metadata=context.invocation_metadata(), timeout=context.time_remaining())
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details(), tuple(error.trailing_metadata()))
        initial = await call.initial_metadata()
        if initial:
            await context.send_initial_metadata(initial)
        context.set_trailing_metadata(tuple(await call.trailing_metadata()))
        return response

    return forward


async def main(listen: str, upstream: str, make_forward) -> None:
    channel = grpc.aio.insecure_channel(upstream)

    class Forward(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(make_forward(channel.unary_unary(details.method)))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Forward(),))
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(None)


if __name__ == "__main__":
    factory = None
    if "--uvloop" in sys.argv:
        import uvloop

        factory = uvloop.new_event_loop
    forward = transparent if "--transparent" in sys.argv else plain
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(sys.argv[1], sys.argv[2], forward))
