"""The console's access rules as tables: the visibility policy for every kind of user × site, and every route of
the real application × role × site against the statuses it must answer (a route missing from the table fails)."""

import re

import pytest

from helpers import CONSOLE_PASSWORD, all_routes

pytest.importorskip("fastapi", reason="the console extra is not installed: pip install -e '.[console]'")
from fastapi.routing import APIRoute  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from fedxr.console import visibility  # noqa: E402
from fedxr.console.app import create_app  # noqa: E402
from fedxr.console.store import Store, User  # noqa: E402

COORD = User("carol", "coordinator", None)
HOSP1 = User("hana", "hospital", "site-1")
HOSP2 = User("sid", "hospital", "site-2")


# --- the policy, without the web ------------------------------------------------------------------------------
@pytest.mark.parametrize("user, site, allowed", [
    (COORD, "site-1", True), (COORD, "site-2", True), (COORD, "site-9", True),
    (HOSP1, "site-1", True), (HOSP1, "site-2", False), (HOSP1, "site-10", False), (HOSP1, "", False),
    (HOSP2, "site-2", True), (HOSP2, "site-1", False),
])
def test_a_hospital_sees_its_own_site_and_a_coordinator_every_site(user, site, allowed):
    assert visibility.may_see_site(user, site) is allowed
    assert (site in visibility.visible_sites(user, ["site-1", "site-2", site])) is allowed


@pytest.mark.parametrize("user, key, allowed", [
    (COORD, "rounds", True), (COORD, "cross_site", True), (COORD, "prevalence", True), (COORD, "gradcam", True),
    (HOSP1, "rounds", False), (HOSP1, "cross_site", False), (HOSP1, "prevalence", False),
    (HOSP1, "gradcam", True), (HOSP1, "roc", True), (HOSP1, "distill", True),
    (COORD, "edge_federation", True), (HOSP1, "edge_federation", False),
])
def test_pictures_of_every_site_are_for_coordinators(user, key, allowed):
    assert visibility.may_see_image(user, key) is allowed


DETAIL = {
    "name": "t", "report": "# every site's data",
    "rounds": [{"round": 0, "aggregate": 0.7, "sites": {"site-1": {"val_auroc": 0.6}, "site-2": {"val_auroc": 0.8}}},
               {"round": 1, "sites": {"site-2": {"val_auroc": 0.9}}}],
    "cross_site": {"site-1": {"global": 0.7}, "site-2": {"global": 0.8}},
    "images": {"rounds": "r.png", "gradcam": "g.png", "prevalence": "p.png"},
}


@pytest.mark.parametrize("user, sites_seen, report, cross, images", [
    (COORD, [{"site-1", "site-2"}, {"site-2"}], True, {"site-1", "site-2"}, {"rounds", "gradcam", "prevalence"}),
    (HOSP1, [{"site-1"}, set()], False, {"site-1"}, {"gradcam"}),
    (HOSP2, [{"site-2"}, {"site-2"}], False, {"site-2"}, {"gradcam"}),
    (User("nobody", "hospital", "site-7"), [set(), set()], False, None, {"gradcam"}),
])
def test_a_run_as_each_user_sees_it(user, sites_seen, report, cross, images):
    seen = visibility.run_detail(user, DETAIL)
    assert [set(r["sites"]) for r in seen["rounds"]] == sites_seen
    assert [r.get("aggregate") for r in seen["rounds"]] == [0.7, None]  # the federation's aggregate stays
    assert (seen["report"] is not None) is report
    assert (set(seen["cross_site"]) if seen["cross_site"] else None) == cross
    assert set(seen["images"]) == images
    assert DETAIL["rounds"][0]["sites"].keys() == {"site-1", "site-2"}  # the run itself is not changed


@pytest.mark.parametrize("user, shows_output", [(COORD, True), (HOSP1, False)])
def test_a_console_started_run_shows_its_output_to_coordinators_only(user, shows_output):
    status = {"name": "t", "running": False, "returncode": 1, "recipe": "q", "env": "sim", "user": "carol",
              "output_tail": "Traceback … /data/site-2/…"}
    seen = visibility.launched_run(user, status, "t")
    assert ("output_tail" in seen) is shows_output
    assert seen["returncode"] == 1
    assert visibility.launched_run(user, status, "another-run") is None
    assert visibility.launched_run(user, None, "t") is None
    assert visibility.may_see_logs(user) is shows_output


# --- every route × role × site, through the real application -----------------------------------------------
ANON, C, H1, H2 = "anonymous", "coordinator", "hospital site-1", "hospital site-2"
ROLES = (ANON, C, H1, H2)
PAGE_NEEDS_SIGN_IN, API_NEEDS_SIGN_IN = 303, 401


def expect(anonymous, coordinator, hospital1, hospital2=None):
    return {ANON: anonymous, C: coordinator, H1: hospital1, H2: hospital1 if hospital2 is None else hospital2}


#: (method, URL, the route it exercises or None) → the status each role must get. POSTs from a signed-in user carry the
#: session's CSRF token (so what is checked is the role, not the token), except /logout (it would end the session).
TABLE = [
    ("GET", "/health", "/health", expect(200, 200, 200)),
    ("GET", "/login", "/login", expect(200, 200, 200)),
    ("POST", "/login", "/login", expect(403, 403, 403)),  # no sign-in form cookie
    ("GET", "/api/openapi.json", "/api/openapi.json", expect(401, 200, 200)),
    ("POST", "/logout", "/logout", expect(PAGE_NEEDS_SIGN_IN, 403, 403)),  # signed in, but no token
    ("GET", "/", "/", expect(PAGE_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/api/runs", "/api/runs", expect(API_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/api/federation", "/api/federation", expect(API_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/runs/new", "/runs/new", expect(PAGE_NEEDS_SIGN_IN, 200, 403)),
    ("POST", "/runs/new", "/runs/new", expect(PAGE_NEEDS_SIGN_IN, 400, 403)),  # 400: no recipe named
    ("GET", "/runs/t", "/runs/{name}", expect(PAGE_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/runs/no-such-run", "/runs/{name}", expect(PAGE_NEEDS_SIGN_IN, 404, 404)),
    ("GET", "/api/runs/t", "/api/runs/{name}", expect(API_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/api/runs/t/progress", "/api/runs/{name}/progress", expect(API_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/runs/t/image/gradcam", "/runs/{name}/image/{key}", expect(PAGE_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/runs/t/image/rounds", "/runs/{name}/image/{key}", expect(PAGE_NEEDS_SIGN_IN, 200, 403)),
    ("GET", "/runs/t/image/cross_site", "/runs/{name}/image/{key}", expect(PAGE_NEEDS_SIGN_IN, 200, 403)),
    ("GET", "/runs/t/image/prevalence", "/runs/{name}/image/{key}", expect(PAGE_NEEDS_SIGN_IN, 200, 403)),
    ("GET", "/sites/site-1", "/sites/{site}", expect(PAGE_NEEDS_SIGN_IN, 200, 200, 403)),
    ("GET", "/sites/site-2", "/sites/{site}", expect(PAGE_NEEDS_SIGN_IN, 200, 403, 200)),
    ("GET", "/api/sites/site-1", "/api/sites/{site}", expect(API_NEEDS_SIGN_IN, 200, 200, 403)),
    ("GET", "/api/sites/site-2", "/api/sites/{site}", expect(API_NEEDS_SIGN_IN, 200, 403, 200)),
    # A traversal in the site name matches no route at all (the decoded path has one more segment).
    ("GET", "/api/sites/..%2Fsite-1", None, expect(404, 404, 404)),
    ("GET", "/models", "/models", expect(PAGE_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/api/models", "/api/models", expect(API_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/models/t_tiny_cnn/tiny_cnn_fp32.onnx", "/models/{folder}/{file}", expect(PAGE_NEEDS_SIGN_IN, 200, 200)),
    ("GET", "/models/t_tiny_cnn/manifest.json", "/models/{folder}/{file}", expect(PAGE_NEEDS_SIGN_IN, 404, 404)),
    ("GET", "/try", "/try", expect(PAGE_NEEDS_SIGN_IN, 200, 200)),
    ("POST", "/api/predict?model=no-such-model", "/api/predict", expect(API_NEEDS_SIGN_IN, 404, 404)),
    ("GET", "/docs", "/docs", expect(PAGE_NEEDS_SIGN_IN, 200, 200)),
]


@pytest.fixture(scope="module")
def clients(console_run):
    Store(console_run["db"]).add_user("sid", "hospital", CONSOLE_PASSWORD, site="site-2")
    app = create_app(console_run["runs"], console_run["db"], console_run["exports"])
    out = {}
    for role, name in ((ANON, None), (C, "carol"), (H1, "hana"), (H2, "sid")):
        client = TestClient(app)
        if name:
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
            r = client.post("/login", data={"name": name, "password": CONSOLE_PASSWORD, "csrf": token},
                            follow_redirects=False)
            assert r.status_code == 303, (name, r.text[:300])
            client.cookies.delete("fedxr_login_csrf")  # so the table's POST /login is a form without its cookie
        out[role] = client
    return app, out


def _csrf(client) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get("/").text).group(1)


def test_every_route_answers_each_role_as_the_table_says(clients):
    app, by_role = clients
    tokens = {role: _csrf(c) for role, c in by_role.items() if role != ANON}
    wrong = []
    for method, url, _, statuses in TABLE:
        for role in ROLES:
            client = by_role[role]
            headers, data = {}, None
            if method == "POST" and role != ANON and url != "/logout":
                headers = {"X-CSRF-Token": tokens[role]}
                data = {"csrf": tokens[role]}
            r = client.request(method, url, headers=headers, data=data, follow_redirects=False)
            if r.status_code != statuses[role]:
                wrong.append(f"{role}: {method} {url} → {r.status_code}, expected {statuses[role]}")
            if r.status_code == PAGE_NEEDS_SIGN_IN and role == ANON and method == "GET":
                assert r.headers["location"].startswith("/login"), url
    assert not wrong, "\n".join(wrong)
    # Every role is still signed in (nothing in the table ended a session).
    assert all(by_role[role].get("/api/runs").status_code == 200 for role in (C, H1, H2))


def test_the_table_covers_every_route_of_the_application(clients):
    app, _ = clients
    in_table = {(m, route) for m, _, route, _ in TABLE}
    missing = []
    for route in all_routes(app.routes):
        if not isinstance(route, APIRoute) and getattr(route, "path", "").startswith("/static"):
            continue
        for method in sorted(set(getattr(route, "methods", None) or {"GET"}) - {"HEAD"}):
            if (method, route.path) not in in_table:
                missing.append(f"{method} {route.path}")
    assert not missing, f"routes with no row in TABLE (add what each role must get): {missing}"


@pytest.mark.parametrize("user, keys", [(COORD, {"state", "stage", "error", "pid", "host"}), (HOSP1, {"state", "stage"})])
def test_how_a_run_stopped_shows_its_error_to_coordinators_only(user, keys):
    status = {"state": "failed", "stage": "teacher", "error": "site-2: /data/site-2/x.png unreadable", "pid": 7,
              "host": "coordinator-1"}
    assert set(visibility.run_state(user, status)) == keys
    assert set(visibility.run_detail(user, {**DETAIL, "run_state": status})["run_state"]) == keys
    assert visibility.run_state(user, None) is None
