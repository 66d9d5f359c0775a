"""Kubernetes probe of a mesh service's gRPC health over TLS (mounted by the aios-mesh chart).

The kubelet's own gRPC probe speaks plaintext and cannot show a client certificate, so under
AIOS_GRPC_AUTH=mtls or tls the chart runs this in the service's container instead:

    python /etc/aios/probe/grpc_health_probe.py --timeout 5 127.0.0.1:50051 aios-aios-mesh-planner.ns.svc

It dials the local port, verifies the server's certificate against AIOS_GRPC_TLS_CA_FILE for the
Service's DNS name (the name the other services dial, so a certificate they would refuse fails here
too), shows AIOS_GRPC_TLS_CERT_FILE and AIOS_GRPC_TLS_KEY_FILE (the container's own: mtls requires a
client certificate) and calls grpc.health.v1.Health/Check, which needs no token. Exit 0 when the
server answers SERVING; 1 otherwise, with one line on stderr that the kubelet puts in the pod's events.
Only grpcio and grpcio-health-checking are imported: a probe runs every few seconds."""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(variable: str) -> bytes | None:
    path = os.environ.get(variable, "")
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC health over the mesh's TLS")
    parser.add_argument("address", help="host:port to dial, e.g. 127.0.0.1:50051")
    parser.add_argument("server_name", help="DNS name the server's certificate must carry")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline of the call, seconds")
    args = parser.parse_args(argv)
    try:
        ca = _read("AIOS_GRPC_TLS_CA_FILE")
        cert, key = _read("AIOS_GRPC_TLS_CERT_FILE"), _read("AIOS_GRPC_TLS_KEY_FILE")
    except OSError as exc:
        print(f"probe: cannot read the credentials: {exc}", file=sys.stderr)
        return 1
    if not ca:
        print("probe: AIOS_GRPC_TLS_CA_FILE is not set: cannot verify the server", file=sys.stderr)
        return 1
    credentials = grpc.ssl_channel_credentials(ca, key if cert else None, cert if key else None)
    options = [("grpc.ssl_target_name_override", args.server_name), ("grpc.default_authority", args.server_name)]
    with grpc.secure_channel(args.address, credentials, options=options) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                 timeout=args.timeout)
        except grpc.RpcError as exc:
            detail = next(iter((exc.details() or "").splitlines()), "")
            print(f"probe: {args.address} ({args.server_name}): {exc.code().name}: {detail}", file=sys.stderr)
            return 1
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        print(f"probe: {args.address} answers {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
