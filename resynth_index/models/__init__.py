"""Models behind small protocols: embedders, captioners, generators, the toy zoo, devices.

Heavy libraries (torch, open_clip, diffusers, transformers) are imported inside the backends only.
"""
