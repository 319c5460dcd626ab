"""``dinokit serve``: an HTTP search service over an index folder, its web page and its Python client.

- :mod:`dinokit.serve.app`: the FastAPI app factory (endpoints of DESIGN.md "HTTP API").
- :mod:`dinokit.serve.batching`: dynamic batching of image queries into shared forwards.
- :mod:`dinokit.serve.auth`: bind and token rules, upload limits.
- :mod:`dinokit.serve.backend`: the one adapter between the service and :class:`dinokit.Index`.
- :mod:`dinokit.serve.client`: :class:`Client`, the HTTP API from Python.

Nothing is imported here: ``import dinokit.serve.client`` must not pull in FastAPI or torch.
"""
