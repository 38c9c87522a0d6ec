"""`rsx serve`: the JSON API against a real uvicorn subprocess on a toy lab.

The service answers exactly what ``rsx query --json`` prints and writes the same audit row; bad
uploads get one line and the right status while the service keeps running; a token guards
everything when given; concurrent queries needing one generator share a generation batch; and
SIGTERM lets the queries in flight finish and be recorded before it exits 0.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
from serving import (  # noqa: E402
    make_toy_images,
    rsx_command,
    running_service,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("serve_extra")]


@pytest.fixture(scope="module")
def labs(toy_lab_template: Path, tmp_path_factory) -> dict[str, Path]:
    """The served lab (the toy lab plus an imported generator, 'mj'), an untouched copy of it
    for the CLI to answer the same questions from scratch, and query images."""
    from resynth_index.lab import Lab

    root = tmp_path_factory.mktemp("service-api")
    served = root / "served"
    shutil.copytree(toy_lab_template, served)
    with Lab.open(served) as lab:
        lab.add_generator("mj", "imported")
    pristine = root / "pristine"
    shutil.copytree(served, pristine)
    images = make_toy_images(
        pristine,
        root / "images",
        [("toy-a", "a lighthouse at dusk", 1000), ("toy-b", "a red bicycle", 1001)],
    )
    return {"served": served, "pristine": pristine, "a": images[0], "b": images[1]}


@pytest.fixture(scope="module")
def service(labs):
    with running_service(labs["served"], "--max-upload-mb", "1") as running:
        yield running


def _post(client, image: Path | bytes, name: str = "suspect.png", **data: str):
    payload = image.read_bytes() if isinstance(image, Path) else image
    return client.post("/v1/query", files={"image": (name, payload, "image/png")}, data=data)


def _cli_json(lab: Path, *args: str) -> list[dict]:
    done = subprocess.run(rsx_command(lab, *args), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_the_answer_is_rsx_query_json_and_its_audit_row(service, labs) -> None:
    caption = "a lighthouse at dusk, compared"
    with service.client() as client:
        response = _post(client, labs["a"], "suspect.png", caption=caption)
        assert response.status_code == 200, response.text
        served = response.json()
        record = client.get(f"/v1/queries/{served['query_id']}").json()
    assert record == served  # the audit row stores the answer exactly as it was given
    [printed] = _cli_json(labs["pristine"], "query", str(labs["a"]), "--caption", caption, "--json")
    # legitimately different: how the image is named (an upload has no path) and the audit id
    assert served["image"] == "upload:suspect.png" and printed["image"] == str(labs["a"])
    for answer in (served, printed):
        del answer["image"], answer["query_id"]
    assert served == printed
    assert served["generated"] == 3 and served["pending"] == ["mj"]


def test_bad_uploads_get_one_line_and_the_service_keeps_running(service, labs) -> None:
    from hostile_files import png_declaring

    good = labs["b"].read_bytes()
    with service.client() as client:
        cases = [
            (_post(client, b"", "empty.png"), 400, "empty"),
            (_post(client, b"just some text, not a picture", "notes.png"), 415, "format"),
            (_post(client, good[: len(good) // 2], "cut.png"), 422, "truncated"),
            (_post(client, png_declaring(100_000, 100_000), "bomb.png"), 422, "pixels"),
            (client.post("/v1/query", files={"caption": (None, "x")}), 400, "no image"),
            (client.post("/v1/query", data={"caption": "not multipart"}), 415, "multipart"),
            (client.post("/v1/query", json={"image": "x"}), 415, "multipart"),
            (_post(client, good, resyntheses="0"), 400, "resyntheses"),
            (_post(client, good, candidates="nobody"), 400, "nobody"),
            (_post(client, good, method="magic"), 400, "method"),
        ]
        for response, status, fragment in cases:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert fragment in error.lower() and "\n" not in error
        assert "/tmp" not in cases[2][0].json()["error"]  # named as uploaded, not by its file
        assert client.get("/healthz").json() == {"ok": True}
        after = _post(client, good, "fine.png", caption="a red bicycle")
        assert after.status_code == 200 and after.json()["image"] == "upload:fine.png"
        assert after.json()["method"] == "resynthesis"
        fused = _post(client, good, "fine.png", caption="a red bicycle", method="fused")
        assert fused.status_code == 200, fused.text
        assert fused.json()["method"] == "fused" and fused.json()["fusion"]["weights"]


def test_an_upload_over_the_limit_gets_413_while_streaming(service, labs) -> None:
    oversized = b"\x89PNG\r\n\x1a\n" + bytes(1536 * 1024)  # 1.5 MB against --max-upload-mb 1
    with service.client() as client:
        response = _post(client, oversized, "huge.png")
        assert response.status_code == 413
        assert "1 MB" in response.json()["error"]

        def endless():  # a body with no declared length, far past the limit
            for _ in range(64):
                yield bytes(64 * 1024)

        boundary = "rsxtestboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"'
            "\r\nContent-Type: image/png\r\n\r\n"
        ).encode()
        streamed = client.post(
            "/v1/query",
            content=iter([head, *endless()]),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert streamed.status_code == 413
        assert client.get("/healthz").json() == {"ok": True}


def test_images_are_served_by_validated_hash_only(service, labs) -> None:
    with service.client() as client:
        answer = _post(client, labs["b"], caption="a red bicycle").json()
        sha = answer["sha256"]
        image = client.get(f"/v1/images/{sha}")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content == labs["b"].read_bytes()
        assert image.headers["x-content-type-options"] == "nosniff"
        for wrong in (
            sha.upper(),
            sha[:-1],
            sha + "0",
            "0" * 64,  # a digest, but of nothing stored
            "..%2F..%2F..%2Fetc%2Fpasswd",
            "%2E%2E",
            f"{sha[:2]}%2F{sha[2:4]}%2F{sha}",
        ):
            response = client.get(f"/v1/images/{wrong}")
            assert response.status_code == 404, wrong
            assert response.headers["content-type"].startswith("application/json")
        assert client.get("/v1/images/../../settings.json").status_code == 404


def test_history_pages_and_searches_by_hash_prefix_or_caption(service, labs) -> None:
    captions = ["zqhist alpha one", "zqhist alpha two", "zqhist beta three"]
    with service.client() as client:
        ids = [_post(client, labs["a"], caption=c).json()["query_id"] for c in captions]
        first = client.get("/v1/queries", params={"q": "zqhist", "limit": 2}).json()
        assert first["total"] == 3
        assert [e["query_id"] for e in first["queries"]] == [ids[2], ids[1]]  # newest first
        rest = client.get("/v1/queries", params={"q": "zqhist", "limit": 2, "offset": 2}).json()
        assert [e["query_id"] for e in rest["queries"]] == [ids[0]]
        alpha = client.get("/v1/queries", params={"q": "ZQHIST ALPHA"}).json()
        assert [e["caption"] for e in alpha["queries"]] == captions[1::-1]
        sha = first["queries"][0]["sha256"]
        by_hash = client.get("/v1/queries", params={"q": sha[:10], "limit": 200}).json()
        assert set(ids) <= {e["query_id"] for e in by_hash["queries"]}
        assert all(e["sha256"] == sha for e in by_hash["queries"])
        assert by_hash["total"] == len(by_hash["queries"])
        everything = client.get("/v1/queries", params={"limit": 200}).json()
        assert everything["total"] >= 3 and everything["queries"][0]["query_id"] == ids[2]
        for bad in ({"limit": 0}, {"limit": "ten"}, {"offset": -1}, {"limit": 10_000}):
            assert client.get("/v1/queries", params=bad).status_code == 400
        assert client.get("/v1/queries/999999").status_code == 404


def test_generators_and_work_orders_match_the_cli(service, labs, tmp_path: Path) -> None:
    caption = "a harbour in fog, for the work order"
    with service.client() as client:
        answer = _post(client, labs["a"], caption=caption, candidates="toy-a,mj").json()
        assert answer["pending"] == ["mj"]
        listing = client.get("/v1/generators").json()
        csv_text = client.get("/v1/work-orders.csv")
    printed = _cli_json(labs["served"], "generator", "list", "--all", "--json")
    assert listing["generators"] == printed
    assert {"generator": "mj", "caption": caption} in [
        {k: o[k] for k in ("generator", "caption")} for o in listing["pending"]
    ]
    written = tmp_path / "orders.csv"
    exported = subprocess.run(
        rsx_command(labs["served"], "export-prompts", "--out", str(written)),
        capture_output=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    assert csv_text.status_code == 200 and csv_text.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv_text.headers["content-disposition"]
    assert csv_text.content == written.read_bytes() and caption in csv_text.text


def test_a_token_guards_every_request(labs, tmp_path: Path) -> None:
    token = "s3cret-token-for-the-tests-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n", encoding="utf-8")
    lab = tmp_path / "lab"
    shutil.copytree(labs["pristine"], lab)
    with running_service(lab, "--token-file", str(token_file), token=token) as service:
        with httpx.Client(base_url=service.url, timeout=120.0) as anonymous:
            for path in ("/healthz", "/v1/queries", "/v1/generators", "/", "/history"):
                refused = anonymous.get(path, headers={"Accept": "application/json"})
                assert refused.status_code == 401, path
                assert refused.json()["error"]
            wrong = anonymous.get("/v1/queries", headers={"Authorization": "Bearer " + "x" * 37})
            assert wrong.status_code == 401
            page = anonymous.get("/", headers={"Accept": "text/html"})
            assert page.status_code == 401 and 'action="/login"' in page.text
            assert _post(anonymous, labs["a"]).status_code == 401
            bad_login = anonymous.post("/login", data={"token": "nope"})
            assert bad_login.status_code == 401
            login = anonymous.post("/login", data={"token": token})
            assert login.status_code == 303
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
            home = anonymous.get("/", headers={"Accept": "text/html"})  # the cookie is kept
            assert home.status_code == 200
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', home.text).group(1)
            forged = _post(anonymous, labs["a"], caption="forged")
            assert forged.status_code == 403  # a cookie alone does not make a form post
            posted = anonymous.post(
                "/v1/query",
                files={"image": ("a.png", labs["a"].read_bytes(), "image/png")},
                data={"caption": "a lighthouse at dusk", "csrf": csrf},
            )
            assert posted.status_code == 200, posted.text
        with service.client() as client:
            assert client.get("/healthz").json() == {"ok": True}
            elsewhere = _post(client, labs["a"], caption="x")
            assert elsewhere.status_code == 200  # a bearer token needs no CSRF token
            origin = {"Origin": "http://evil.example"}
            cross = client.post("/v1/query", headers=origin, files={"image": ("a", b"x")})
            assert cross.status_code == 403
            assert "access-control-allow-origin" not in {k.lower() for k in cross.headers}


def test_beyond_the_loopback_a_token_is_required(labs, tmp_path: Path) -> None:
    refused = subprocess.run(
        rsx_command(labs["pristine"], "serve", "--host", "0.0.0.0", "--port", "0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "--token-file" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    short = tmp_path / "short-token"
    short.write_text("abc", encoding="utf-8")
    too_short = subprocess.run(
        rsx_command(labs["pristine"], "serve", "--host", "0.0.0.0", "--token-file", str(short)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert too_short.returncode == 1 and "at least 16 characters" in too_short.stderr


def test_a_loopback_service_refuses_foreign_host_headers(service) -> None:
    with service.client() as client:
        assert client.get("/healthz", headers={"Host": "attacker.example"}).status_code == 421
        assert client.get("/healthz", headers={"Host": "localhost:1"}).status_code == 200


def test_concurrent_queries_for_one_generator_share_a_generation_batch(labs, tmp_path) -> None:
    lab = tmp_path / "lab"
    shutil.copytree(labs["pristine"], lab)
    captions = [f"a batched scene number {i}" for i in range(8)]
    # a wide gather window: the eight requests need not all land within the default 30 ms
    with running_service(lab, "--gather-ms", "1500") as service:
        with service.client(limits=_limits(8)) as client:
            before = client.get("/v1/worker").json()

            def ask(caption: str):
                return _post(client, labs["b"], caption=caption, candidates="toy-a")

            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(ask, captions))
            after = client.get("/v1/worker").json()
    answers = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), [a.get("error") for a in answers]
    assert sorted(a["caption"] for a in answers) == sorted(captions)
    assert all(a["generated"] == 1 and a["candidates"] == ["toy-a"] for a in answers)
    assert after["generation_batches"] - before["generation_batches"] <= 2
    assert after["batches"] - before["batches"] <= 2
    assert after["answered"] - before["answered"] == 8


def _limits(n: int):
    return httpx.Limits(max_connections=n, max_keepalive_connections=n)


def test_sigterm_lets_queries_in_flight_finish_and_be_recorded(labs, tmp_path: Path) -> None:
    from resynth_index.lab import Lab
    from resynth_index.service.records import audit_record, history

    lab = tmp_path / "lab"
    shutil.copytree(labs["pristine"], lab)
    outcome: dict = {}
    with running_service(lab, "--gather-ms", "3000") as service:
        with service.client() as client:

            def ask() -> None:
                outcome["response"] = _post(client, labs["a"], caption="in flight at shutdown")

            asking = threading.Thread(target=ask)
            asking.start()
            background = _post(client, labs["b"], caption="queued at shutdown", **{"async": "1"})
            assert background.status_code == 202
            deadline = time.monotonic() + 120
            while not client.get("/v1/worker").json()["busy"]:  # the worker holds the batch
                assert time.monotonic() < deadline, "the worker never took the queries"
                time.sleep(0.05)
            assert "response" not in outcome  # still gathering: the queries are in flight
            status = service.stop(signal.SIGTERM)
            asking.join(timeout=120)
        assert status == 0, service.stderr()
        assert "Traceback" not in service.stderr()
    response = outcome["response"]
    assert response.status_code == 200, response.text
    answer = response.json()
    with Lab.open(lab) as opened:
        assert audit_record(opened, answer["query_id"]) == answer
        recorded = history(opened, "queued at shutdown").entries
    assert [e["caption"] for e in recorded] == ["queued at shutdown"]


def test_the_worker_answers_what_is_waiting_with_one_generate_call(labs, tmp_path, monkeypatch):
    """In process, the model itself counted: eight queued queries for one generator, eight
    captions, become one ``run_queries`` call and one ``generate()`` of eight images (the lab's
    batch set to 8: ``auto`` is 4 on a CPU, which would cut them into two generation batches)."""
    from hostile_files import rsx

    from resynth_index.models.generators.diffusers import DiffusersGenerator
    from resynth_index.service.jobs import QueryJob
    from resynth_index.service.worker import QueryWorker

    calls: list[int] = []
    original = DiffusersGenerator.generate

    def counting(self, requests, *args, **kwargs):
        calls.append(len(requests))
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(DiffusersGenerator, "generate", counting)
    lab = tmp_path / "lab"
    shutil.copytree(labs["pristine"], lab)
    assert rsx(lab, "config", "set", "generation_batch_size", "8").exit_code == 0
    worker = QueryWorker(lab, gather_s=0.0)
    jobs, ended = [], threading.Semaphore(0)
    for i in range(8):
        upload = tmp_path / f"upload-{i}"
        shutil.copyfile(labs["b"], upload)
        job = QueryJob(upload, f"upload:{i}.png", f"a waiting scene {i}", ("toy-a",))
        job.add_done_callback(lambda _job: ended.release())
        worker.submit(job)  # all eight wait before the worker starts
        jobs.append(job)
    worker.start()
    for _ in jobs:
        assert ended.acquire(timeout=600), "a job never ended"
    worker.stop(timeout=600)
    assert [job.state for job in jobs] == ["done"] * 8, [job.error for job in jobs]
    assert calls == [8]
    assert worker.stats()["batches"] == 1 and worker.stats()["generation_batches"] == 1
    assert not any(job.path.exists() for job in jobs)  # uploads are removed once answered


def test_a_background_job_reports_its_stage_then_its_answer(service, labs) -> None:
    with service.client() as client:
        started = _post(client, labs["a"], caption="a job in the background", **{"async": "1"})
        assert started.status_code == 202
        job = started.json()
        assert started.headers["location"] == f"/v1/jobs/{job['job']}"
        assert job["state"] in {"queued", "running", "done"}
        seen = set()
        deadline = time.monotonic() + 300
        while job["state"] not in {"done", "failed"}:
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
            job = client.get(f"/v1/jobs/{job['job']}").json()
            seen.add(job["stage"].split(" ")[0])
        assert job["state"] == "done", job
        assert seen <= {"queued", "waiting", "captioning", "generating", "embedding", "done"}
        assert job["answer"] == client.get(f"/v1/queries/{job['query_id']}").json()
        assert client.get("/v1/jobs/" + "x" * 22).status_code == 404
        # the page's form without script: candidate boxes, then a redirect to the answer
        form = client.post(
            "/query",
            files=[
                ("image", ("form.png", labs["a"].read_bytes(), "image/png")),
                ("candidate", (None, "toy-a")),
                ("candidate", (None, "toy-b")),
                ("caption", (None, "a job in the background")),
            ],
        )
        assert form.status_code == 303
        shown = client.get(form.headers["location"], headers={"Accept": "text/html"})
        assert shown.status_code == 200 and 'id="verdict"' in shown.text
        answer = client.get("/v1" + form.headers["location"]).json()
        assert answer["candidates"] == ["toy-a", "toy-b"] and answer["reused"] == 2
