"""Content hashes (resynth_index/hashing.py): one definition of every digest the lab keys on."""

from __future__ import annotations

import hashlib
import io

from resynth_index import hashing


def test_file_and_stream_digests_equal_the_digest_of_the_bytes(tmp_path):
    data = bytes(range(256)) * (2 * hashing.CHUNK // 256) + b"tail"  # crosses chunk boundaries
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    assert hashing.hash_file(path) == hashing.hash_bytes(data) == hashlib.sha256(data).hexdigest()
    stream = io.BytesIO(data)
    stream.seek(10)  # a stream is hashed from where it stands to its end
    assert hashing.hash_stream(stream) == hashing.hash_bytes(data[10:])


def test_equal_json_gives_equal_digests_and_order_of_parts_matters():
    assert hashing.canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert hashing.hash_json({"b": 1, "a": 2}) == hashing.hash_json({"a": 2, "b": 1})
    assert hashing.hash_json({"a": 1}) != hashing.hash_json({"a": 1.5})
    assert hashing.combine("x", "y") != hashing.combine("y", "x")
    assert hashing.combine("x", "y") != hashing.combine("xy")
