"""`fedxr console`: every route behind a session, hospital boundaries, CSRF, lock-out, uploads and downloads
(through FastAPI's TestClient against a real run folder and real exported models)."""

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from helpers import CONSOLE_PASSWORD, GRADIENT, all_routes, SHARED_NIH, phantom_training_image, write_dicom

pytest.importorskip("fastapi", reason="the console extra is not installed: pip install -e '.[console]'")
from fastapi.routing import APIRoute  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from fedxr.cli import main  # noqa: E402
from fedxr.console.app import create_app, markdown_to_html  # noqa: E402
from fedxr.console.predict import MAX_UPLOAD_BYTES  # noqa: E402

SAMPLE = {"name": "t", "key": "rounds", "site": "site-1", "folder": "t_tiny_cnn", "file": "tiny_cnn_fp32.onnx"}


@pytest.fixture(scope="module")
def app(console_run):
    return create_app(console_run["runs"], console_run["db"], console_run["exports"])


def sign_in(client: TestClient, name: str, password: str = CONSOLE_PASSWORD):
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"name": name, "password": password, "csrf": token, "next": "/"},
                       follow_redirects=False)


@pytest.fixture()
def coordinator(app):
    client = TestClient(app)
    assert sign_in(client, "carol").status_code == 303
    return client


@pytest.fixture()
def hospital(app):
    client = TestClient(app)
    assert sign_in(client, "hana").status_code == 303
    return client


def csrf_of(client: TestClient) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get("/").text).group(1)


def test_every_route_needs_a_session(app):
    client = TestClient(app)
    checked = 0
    for route in all_routes(app.routes):
        path = getattr(route, "path", "")
        if path in ("/login", "/health") or path.startswith("/static"):
            continue
        methods = (route.methods if isinstance(route, APIRoute) else getattr(route, "methods", None)) or {"GET"}
        url = re.sub(r"\{(\w+)\}", lambda m: SAMPLE[m.group(1)], path)
        for method in sorted(set(methods) - {"HEAD"}):
            r = client.request(method, url, follow_redirects=False)
            if path.startswith("/api/"):
                assert r.status_code == 401, (method, path, r.status_code)
            else:
                assert r.status_code == 303, (method, path, r.status_code)
                assert r.headers["location"].startswith("/login"), (method, path)
            checked += 1
    assert checked >= 18  # the enumeration found the app's routes (19 today)
    assert client.get("/health").json()["status"] == "ok"


def test_every_route_but_sign_in_and_health_sits_behind_the_session_dependency(app):
    """Not only what the routes answer today: each one is registered with the router-level dependency that
    demands a session before the route's own code runs, so a new route cannot forget it."""
    public = {"/login", "/health"}
    guarded, unguarded = [], []
    for route in all_routes(app.routes):
        if not isinstance(route, APIRoute):
            continue  # static files; FastAPI's own openapi route is guarded by middleware (checked above)
        deps = {getattr(d.dependency, "__name__", "") for d in route.dependencies}
        (guarded if "signed_in" in deps else unguarded).append(route.path)
    assert {p for p in unguarded} == public
    assert len(guarded) >= 18


def test_session_cookie_flags_and_sign_out(app):
    client = TestClient(app)
    r = sign_in(client, "carol")
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("fedxr_session="))
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert client.get("/").status_code == 200
    assert client.post("/logout", data={}, follow_redirects=False).status_code == 403  # no CSRF token
    r = client.post("/logout", data={"csrf": csrf_of(client)}, follow_redirects=False)
    assert r.headers["location"] == "/login"
    assert client.get("/", follow_redirects=False).status_code == 303  # the session is gone server-side too


def test_wrong_password_and_lockout_are_audited(app, console_run):
    from fedxr.console.store import Store

    Store(console_run["db"]).add_user("lou", "hospital", CONSOLE_PASSWORD, site="site-2")
    client = TestClient(app)
    for _ in range(5):
        r = sign_in(client, "lou", "wrong-password-00")
        assert r.status_code == 401
        assert "wrong user name or password" in r.text
    r = sign_in(client, "lou")  # the right password, but locked now
    assert r.status_code == 429
    assert "too many failed sign-ins" in r.text
    events = [e["event"] for e in Store(console_run["db"]).audit_log() if e["user"] == "lou"]
    assert events.count("sign-in-failed") == 5
    assert "sign-in-refused" in events


def test_login_form_needs_its_token_and_next_stays_on_site(app):
    client = TestClient(app)
    client.get("/login")
    r = client.post("/login", data={"name": "carol", "password": CONSOLE_PASSWORD, "csrf": "forged"},
                    follow_redirects=False)
    assert r.status_code == 403
    page = client.get("/login?next=//evil.example.org/x")
    assert 'value="/"' in page.text  # an off-site `next` is replaced by the home page


def test_hospital_sees_its_own_site_only(hospital, coordinator):
    assert hospital.get("/sites/site-1").status_code == 200
    r = hospital.get("/sites/site-2")
    assert r.status_code == 403
    assert "site-1" in r.text
    assert hospital.get("/api/sites/site-2").status_code == 403
    assert hospital.get("/runs/new").status_code == 403  # coordinators only
    assert coordinator.get("/sites/site-2").status_code == 200
    site = coordinator.get("/api/sites/site-1").json()
    run = site["runs"][0]
    assert run["data"]["images"] > 0
    assert [r["round"] for r in run["rounds"] if isinstance(r["round"], int)] == [0, 1]


def test_hospital_sees_the_aggregate_and_its_own_site_on_run_pages(hospital):
    detail = hospital.get("/api/runs/t").json()
    assert detail["report"] is None  # the report lists every site's data
    for r in detail["rounds"]:
        assert set(r["sites"]) <= {"site-1"}
    assert set(detail["cross_site"]) == {"site-1"}
    progress = hospital.get("/api/runs/t/progress").json()
    assert all(set(r["sites"]) <= {"site-1"} for r in progress["rounds"])
    assert hospital.get("/runs/t/image/prevalence").status_code == 403
    assert hospital.get("/runs/t/image/gradcam").status_code == 200


def test_oversized_or_unsized_form_posts_are_refused_before_parsing(app):
    client = TestClient(app)
    client.get("/login")
    r = client.post("/login", data={"name": "carol", "password": "x" * 70_000, "csrf": "t"})
    assert r.status_code == 413
    # Right token and password, but with a file part: refused before any upload reaches a temp file.
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", files={"f": ("a.bin", b"0" * 10)},
                    data={"name": "carol", "password": CONSOLE_PASSWORD, "csrf": token}, follow_redirects=False)
    assert r.status_code == 400
    assert "fedxr_session" not in r.headers.get("set-cookie", "")


def test_run_pages_show_rounds_models_and_report(coordinator):
    runs = coordinator.get("/api/runs").json()
    assert [r["name"] for r in runs] == ["t"]
    assert runs[0]["teacher_macro_auroc"] is not None
    progress = coordinator.get("/api/runs/t/progress").json()
    numbered = [r for r in progress["rounds"] if isinstance(r["round"], int)]
    assert len(numbered) == 2
    assert set(numbered[0]["sites"]) == {"site-1", "site-2"}
    assert all(s["done"] for s in progress["stages"].values() if not s["disabled"])
    page = coordinator.get("/runs/t").text
    assert "rounds-chart" in page
    assert '<h3>Federated teacher</h3>' in page  # the report, rendered (its headings one level down)
    assert coordinator.get("/runs/t/image/gradcam").headers["content-type"] == "image/png"
    assert coordinator.get("/runs/t/image/nope").status_code == 404
    assert coordinator.get("/runs/..%2F..%2Fetc/image/rounds").status_code == 404


def test_downloads_are_the_manifest_files_and_nothing_else(coordinator, console_run, tmp_path):
    models = coordinator.get("/api/models").json()
    folder = next(m for m in models if m["folder"] == "t_tiny_cnn")
    f = next(x for x in folder["files"] if x["kept"])
    r = coordinator.get(f"/models/t_tiny_cnn/{f['file']}")
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == f["sha256"]
    exports = console_run["exports"]
    # A file in the folder but not in its manifest, a link listed in it that points outside, traversal.
    (exports / "t_tiny_cnn" / "notes.txt").write_text("not a model")
    manifest_path = exports / "t_tiny_cnn" / "manifest.json"
    saved = manifest_path.read_text()
    manifest = json.loads(saved)
    outside = tmp_path / "secret.onnx"
    outside.write_text("secret")
    (exports / "t_tiny_cnn" / "evil.onnx").symlink_to(outside)
    manifest["files"].append({"file": "evil.onnx", "format": "onnx-fp32", "kept": True})
    manifest_path.write_text(json.dumps(manifest))
    try:
        for url in ["/models/t_tiny_cnn/notes.txt", "/models/t_tiny_cnn/evil.onnx", "/models/t_tiny_cnn/manifest.json",
                    "/models/t_tiny_cnn/..%2F..%2Fconsole.sqlite", "/models/..%2Ft_tiny_cnn/tiny_cnn_fp32.onnx",
                    "/models/t_tiny_cnn/%2Fetc%2Fpasswd", "/models/%2E%2E/console.sqlite",
                    f"/models/t_tiny_cnn/{f['file']}%00.txt"]:
            r = coordinator.get(url)
            assert r.status_code == 404, url
            assert b"secret" not in r.content
    finally:
        manifest_path.write_text(saved)
        (exports / "t_tiny_cnn" / "evil.onnx").unlink()


def _files_under(*folders: Path) -> set[str]:
    found = set()
    for folder in folders:
        for root, _, files in os.walk(folder):
            found.update(os.path.join(root, f) for f in files)
    return found


def test_try_predicts_in_memory_with_a_heatmap(coordinator, console_run, tmp_path, monkeypatch):
    png = SHARED_NIH / "00000001_000.png"
    if not png.is_file():
        png = tmp_path / "ramp.png"
        Image.fromarray(GRADIENT).save(png)
    write_dicom(tmp_path / "study.dcm", GRADIENT.astype("uint16") * 16, window=(2000, 1000))
    phantom = phantom_training_image(console_run)
    token = re.search(r'data-csrf="([^"]+)"', coordinator.get("/try").text).group(1)
    # Any temporary file (a spooled upload) would land in this empty folder.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    watched = (tmp_path / "tmp", console_run["runs"], console_run["exports"])
    before, cwd_before = _files_under(*watched), set(os.listdir())
    for path in (phantom, png, tmp_path / "study.dcm"):
        r = coordinator.post("/api/predict?model=t_tiny_cnn", content=path.read_bytes(),
                             headers={"X-CSRF-Token": token, "X-Filename": path.name})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["probabilities"]) == 14
        assert body["synthetic"] is True and "SYNTHETIC DATA" in body["trained_on"]  # a phantom model says so
        assert body["calibrated"] is True
        for p in body["probabilities"]:  # a finding: reliable and above its operating point's threshold
            assert p["finding"] == (p["reliable"] and p["probability"] >= p["threshold"] and body["in_distribution"])
            assert p["reliable"] == (p["why"] is None)
        if path == phantom:  # the kind of image it was trained on: findings and a heatmap
            assert body["in_distribution"] is True and body["ood_reason"] is None
            assert body["heatmap"].startswith("data:image/png;base64,")
        else:  # a real film and a gradient ramp are not: a warning, no findings, no heatmap
            assert body["in_distribution"] is False and "not like the images" in body["ood_reason"]
            assert body["findings"] == [] and body["heatmap"] is None
    r = coordinator.post("/api/predict?model=t_tiny_cnn", content=b"\x89PNG broken", headers={"X-CSRF-Token": token})
    assert r.status_code == 422
    assert "upload a PNG, JPEG or DICOM" in r.json()["detail"]
    r = coordinator.post("/api/predict?model=t_tiny_cnn", content=b"0" * (MAX_UPLOAD_BYTES + 1),
                         headers={"X-CSRF-Token": token})
    assert r.status_code == 413
    assert "larger than 20 MB" in r.json()["detail"]
    assert coordinator.post("/api/predict?model=t_tiny_cnn", content=png.read_bytes()).status_code == 403  # no token
    assert coordinator.post("/api/predict?model=..%2Ft_tiny_cnn", content=png.read_bytes(),
                            headers={"X-CSRF-Token": token}).status_code == 404
    assert _files_under(*watched) == before, "an upload was written to disk"
    assert set(os.listdir()) == cwd_before


def test_new_run_form_validates_and_needs_csrf(coordinator):
    token = csrf_of(coordinator)
    assert coordinator.post("/runs/new", data={"recipe": "quickstart.yaml"}).status_code == 403
    r = coordinator.post("/runs/new", data={"csrf": token, "recipe": "../etc/passwd", "env": "sim"})
    assert r.status_code == 400
    assert "no recipe" in r.text
    r = coordinator.post("/runs/new", data={"csrf": token, "recipe": "quickstart.yaml", "env": "sim",
                                            "overrides": "output.runs_dir=/tmp/elsewhere"})
    assert r.status_code == 400
    assert "sets output.runs_dir itself" in r.text
    r = coordinator.post("/runs/new", data={"csrf": token, "recipe": "quickstart.yaml", "env": "prod"})
    assert r.status_code == 400


def test_users_have_no_defaults_and_the_server_refuses_an_open_address(tmp_path, capsys, monkeypatch):
    db = str(tmp_path / "c.sqlite")
    assert main(["console", "--db", db]) == 1
    assert "no users" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("short\n"))
    assert main(["console", "add-user", "ann", "--role", "coordinator", "--password-stdin", "--db", db]) == 1
    assert "at least 10 characters" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("long-enough-password\n"))
    assert main(["console", "add-user", "ann", "--role", "coordinator", "--password-stdin", "--db", db]) == 0
    assert main(["console", "list-users", "--db", db]) == 0
    assert "ann" in capsys.readouterr().out
    assert main(["console", "--db", db, "--host", "0.0.0.0"]) == 1
    assert "--tls-cert" in capsys.readouterr().err
    import sqlite3

    stored = sqlite3.connect(db).execute("SELECT hash FROM users WHERE name='ann'").fetchone()[0]
    assert stored.startswith("$argon2id$")
    assert "long-enough-password" not in stored


def test_report_markdown_survives_odd_input():
    assert "<table>" not in markdown_to_html("|---|---|\n", lambda s: None)
    assert "<td>1</td>" in markdown_to_html("| a |\n|:--|\n| 1 |\n", lambda s: None)
    assert "<pre>open\nblock</pre>" in markdown_to_html("```\nopen\nblock\n", lambda s: None)


def test_report_markdown_is_escaped():
    out = markdown_to_html("# Title <script>\n| a | b |\n|---|---|\n| <b>x</b> | `y` |\n![p](nope.png)\n",
                           lambda src: None)
    assert "<script>" not in out
    assert "&lt;script&gt;" in out
    assert "<td>&lt;b&gt;x&lt;/b&gt;</td>" in out
    assert "<img" not in out  # images only where the console serves them


@pytest.mark.slow
def test_federation_status_says_when_the_server_is_unreachable(tmp_path):
    """With a real admin startup kit (provisioned from deploy/project.yml) and no server running, the home
    page reports the failure instead of hanging or crashing."""
    import shutil
    import subprocess
    import sys
    import time

    from helpers import ROOT

    nvflare = shutil.which("nvflare") or str(Path(sys.executable).with_name("nvflare"))
    subprocess.run([nvflare, "provision", "-p", str(ROOT / "deploy" / "project.yml"), "-w", str(tmp_path / "ws")],
                   check=True, capture_output=True, timeout=300)
    kit = next(p.parent.parent for p in (tmp_path / "ws").rglob("startup/fed_admin.json"))
    from fedxr.console.flare import Federation

    t = time.time()
    status = Federation(kit, timeout_s=3).status()
    assert "error" in status
    assert str(kit) in status["error"]
    assert time.time() - t < 60


def test_models_page_shows_the_model_card_escaped(coordinator, console_run):
    page = coordinator.get("/models").text
    assert "Trained on synthetic data — not for diagnosis." in page
    assert "<summary>Model card</summary>" in page and "Known limits" in page
    assert "<strong>TRAINED ON SYNTHETIC DATA" in page  # the card's own banner, rendered
    card = console_run["exports"] / "t_tiny_cnn" / "MODEL_CARD.md"
    original = card.read_text()
    try:  # a card is data: markup inside it is shown, never run
        card.write_text(original + "\n- <script>alert(1)</script>\n")
        page = coordinator.get("/models").text
        assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    finally:
        card.write_text(original)


def test_console_loads_the_try_models_in_the_background_at_start(console_run):
    from fedxr.console import predict

    predict._models.clear()
    app = create_app(console_run["runs"], console_run["db"], console_run["exports"], warm_up=True)
    client = TestClient(app)
    assert client.get("/health").status_code == 200  # pages answer while the models load
    app.state.warm_up.join(timeout=120)
    assert not app.state.warm_up.is_alive()
    assert str((console_run["exports"] / "t_tiny_cnn").resolve()) in predict._models
