"""OpenTelemetry's OTLP messages (trace, metrics, common, resource) and collector services
(trace, metrics), generated from proto/opentelemetry/ by scripts/gen-proto.sh (see
proto/README.md); everything below this package is generated, do not edit it.

Modules are at their proto paths under this package, e.g.
`gateway.otlp_api.opentelemetry.proto.collector.trace.v1.trace_service_pb2`. Their files live
in POOL, a descriptor pool of their own, not in protobuf's default pool: the opentelemetry-proto
package registers the same file names there, and xds-protos installs an older copy of them over
its files, so whatever version of those is installed or imported never meets these.
The message and service names are OTLP's, so the wire protocol is the standard one.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
