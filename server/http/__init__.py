"""The HTTP door: OpenAI-compatible and feature routes and the playground (``app``), JSON
bodies to the core's types (``bodies``) and back (``shape``), status mapping (``errors``),
enum names (``names``) and uvicorn with connection limits (``server``). It never imports
the gRPC door."""
