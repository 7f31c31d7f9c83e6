"""`anomalab serve RUN_DIR`: a fitted run behind HTTP, for a line PC or a small inspection station.

    POST /v1/score        multipart image files (field `images`, one or many) -> JSON per image: name,
                          score, verdict, threshold, size; with ?maps=true the overlay (base64 PNG, on the
                          run's threshold-anchored colour scale, `anomalab.predict.ColourScale`)
    GET  /v1/model        detector, params, threshold, input shape, engine, versions, limits
    GET  /healthz         {"status": "ok"}
    GET  /                one self-contained page: drop images, see overlays, scores, verdicts, and what
                          another threshold would decide (on the page only)

Concurrent requests are scored together: one worker thread collects the images that arrive within a few
milliseconds into batches (`batcher.Batcher`). Security defaults: bind 127.0.0.1; with a token, every
request but the static page needs `Authorization: Bearer <token>`; requests over the size limit (413),
images over `anomalab.data.folder.MAX_PIXELS` pixels (413, checked from the header before decoding),
files that are not images (415) are refused with a message naming the file; no request names a path on
the server; no OpenAPI or docs pages. Needs the extra: `pip install anomalab[serve]`.
"""
