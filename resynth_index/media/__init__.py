"""Everything that parses untrusted bytes: images, the text embedded in them, sidecar captions.

One place to audit: every function here must treat its input as hostile (bounded size, bounded
time, one clear error).
"""
