"""Generated code of proto/authz_gateway/admin/v1/admin.proto (scripts/gen-proto.sh); do not edit."""
