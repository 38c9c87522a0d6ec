"""``rsx serve``: the lab as an HTTP service (the ``[serve]`` extra).

One process per lab and machine keeps the embedder and the generators loaded. Requests go to a
bounded queue; two lanes share the models: the fast lane answers queries that need no
generation, the generating lane the rest in batches, so concurrent queries that need the same
generator share one generation batch and a cached repeat never waits behind one. The JSON API
gives exactly what ``rsx query --json`` prints; the web page is server-rendered HTML over it.

  protocol   the limits before any token: connections, header block, header and body timeouts
  security   the token, login sessions and their throttle, CSRF, peer/Host/Origin checks,
             response headers, the one-line request log
  responses  JSON bodies, errors in the web's words, strictly parsed numbers and ids
  uploads    a multipart body streamed into a private file, with size limits; the header read
  jobs       one query on its way through the worker, the queue, the board that finds it by id
  routing    which lane answers a query; the memory of warm captions; a group's progress
  worker     the model worker: its supervisor, the lanes, bounds (queue, pixels, time), stop
  records    what the read-only endpoints show: history, audit records, generators, blobs
  page       the server-rendered HTML (everything escaped)
  app        the routes: the API, the pages, the lifespan, errors as one line
  server     the listening socket, uvicorn with the guard, the ready line, a bounded stop
"""
