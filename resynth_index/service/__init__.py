"""``rsx serve``: the lab as an HTTP service (the ``[serve]`` extra).

One process per lab and machine keeps the embedder and the generators loaded. Requests go to a
queue; one worker thread per device owns the models and answers what is waiting in batches, so
concurrent queries that need the same generator share one generation batch. The JSON API gives
exactly what ``rsx query --json`` prints; the web page is server-rendered HTML over that API.

  security  the token, the login cookie, CSRF, Host/Origin checks and response headers
  uploads   a multipart body streamed into a private file, with size limits
  jobs      one query on its way through the worker, and the board that finds it by id
  worker    the model worker: the queue, micro-batching, progress, graceful stop
  records   what the read-only endpoints show: history, audit records, generators, blobs
  page      the server-rendered HTML (everything escaped)
  app       the routes: the API, the pages, the lifespan
  server    uvicorn with the ready line and a graceful SIGTERM
"""
