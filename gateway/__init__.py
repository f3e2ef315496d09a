"""authz-gateway: an Envoy ext_authz service that binds sessions to identities with CEL policies."""

__version__ = "0.1.0"
