"""The gRPC door: ``steering.v1`` messages to the core's types and back (``convert``), the
servicer (``servicer``), status mapping (``errors``) and the server (``server``). It never
imports the HTTP door."""
