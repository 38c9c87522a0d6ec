"""The Ray executor: generation fanned out over a pool of actors, stored by one coordinator.

Optional (the ``[scale]`` extra): nothing here imports ray until a run asks for it, so the rest
of rsx works without it. ``executor`` plans and stores; ``actors`` holds one generator per actor.
"""
