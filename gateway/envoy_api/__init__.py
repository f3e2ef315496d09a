"""Envoy's ext_authz and ext_proc APIs, generated from proto/ by scripts/gen-proto.sh (see
proto/README.md); everything below this package is generated, do not edit it.

Modules are at their proto paths under this package, e.g.
`gateway.envoy_api.envoy.service.auth.v3.external_auth_pb2`. Their files live in POOL, a
descriptor pool of their own, not in protobuf's default pool: another copy of the same .proto
files there (the xds-protos package, say) would otherwise clash with these ("duplicate file
name" or "duplicate symbol") as soon as both are imported in one process. The message classes
are theirs, too: a `google.protobuf.Struct` field here takes this pool's Struct, not
`struct_pb2.Struct` (build such values through the message, e.g. `msg.field.update(...)`).
"""

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    message_factory,
    empty_pb2,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)

POOL = descriptor_pool.DescriptorPool()
# The well-known types the generated files import, exactly as this protobuf runtime has them.
for _module in (descriptor_pb2, any_pb2, duration_pb2, empty_pb2, struct_pb2, timestamp_pb2, wrappers_pb2):
    POOL.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)
    # Their classes, now: the pure-Python protobuf runtime builds no class on first use.
    message_factory.GetMessageClassesForFiles([_module.DESCRIPTOR.name], POOL)
del _module
