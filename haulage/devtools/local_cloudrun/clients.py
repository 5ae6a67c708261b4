"""Real ``google.cloud.run_v2`` clients pointed at a local Cloud Run server."""

from __future__ import annotations

import grpc
from google.cloud import run_v2
from google.cloud.run_v2.services.executions.transports import ExecutionsGrpcTransport
from google.cloud.run_v2.services.jobs.transports import JobsGrpcTransport

from haulage.dispatch.bearer import BearerToken


def make_clients(address: str, token: str | None = None) -> tuple[run_v2.JobsClient, run_v2.ExecutionsClient]:
    """Real run_v2 clients for ``host:port`` over one insecure channel, sending ``token`` as a bearer token.

    Close both with ``jobs.transport.close()``: they share the channel.

    Example::

        jobs, executions = make_clients(server.address, server.token)
    """
    channel = grpc.insecure_channel(address)
    if token is not None:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    return (
        run_v2.JobsClient(transport=JobsGrpcTransport(channel=channel)),
        run_v2.ExecutionsClient(transport=ExecutionsGrpcTransport(channel=channel)),
    )
