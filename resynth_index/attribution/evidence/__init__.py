"""The signals an answer rests on, one module each (see ``attribution``)."""
