"""Serving internals without Ray: the HTTP request contract (`api`) and batched, per-request-seeded
sampling plus image encoding (`engine`). The Ray Serve app itself is `maskgil.serve`."""
