"""Small Keystone/Cinder API helper for bring-up (stdlib only, one process
instead of a dozen openstack CLI start-ups of ~2 s each).

  python3 os_api.py catalog KEYSTONE_V3_URL ADMIN_PASS CINDER_URL CINDER_PASS TENANT_PASS
  python3 os_api.py wait-volume-up KEYSTONE_V3_URL ADMIN_PASS HOST TIMEOUT_S
"""
import json
import sys
import time
import urllib.error
import urllib.request


def call(method, url, token=None, body=None, headers=None):
    h = {"Content-Type": "application/json", "Connection": "close"}
    if token:
        h["X-Auth-Token"] = token
    h.update(headers or {})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, r.headers, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        raise SystemExit(f"{method} {url}: HTTP {e.code}: {raw[:500]!r}")


def token(ks, user, password, project):
    body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": user, "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}}
    _, headers, doc = call("POST", f"{ks}/auth/tokens", body=body)
    return headers["X-Subject-Token"], doc["token"]


def find(ks, tok, kind, name):
    _, _, doc = call("GET", f"{ks}/{kind}?name={name}", tok)
    items = doc[kind]
    return items[0]["id"] if items else None


def ensure(ks, tok, kind, singular, name, extra):
    found = find(ks, tok, kind, name)
    if found:
        return found
    _, _, doc = call("POST", f"{ks}/{kind}", tok, {singular: dict(name=name, **extra)})
    return doc[singular]["id"]


def catalog(ks, admin_pass, cinder_url, cinder_pass, tenant_pass):
    tok, _ = token(ks, "admin", admin_pass, "admin")
    ids = {}
    for p in ("service", "tenant"):
        ids[p] = ensure(ks, tok, "projects", "project", p, {"domain_id": "default"})
    users = {
        "cinder": ensure(ks, tok, "users", "user", "cinder",
                         {"domain_id": "default", "password": cinder_pass}),
        "tenant": ensure(ks, tok, "users", "user", "tenant",
                         {"domain_id": "default", "password": tenant_pass}),
    }
    roles = {r: ensure(ks, tok, "roles", "role", r, {}) for r in ("admin", "service", "member")}
    for project, user, role in (("service", "cinder", "admin"),
                                ("service", "cinder", "service"),
                                ("tenant", "tenant", "member")):
        call("PUT", f"{ks}/projects/{ids[project]}/users/{users[user]}/roles/{roles[role]}", tok)
    for stype, sname in (("volumev3", "cinderv3"), ("block-storage", "cinder")):
        _, _, doc = call("GET", f"{ks}/services?type={stype}", tok)
        if doc["services"]:
            continue
        _, _, doc = call("POST", f"{ks}/services", tok, {"service": {
            "type": stype, "name": sname, "description": "Block Storage", "enabled": True}})
        sid = doc["service"]["id"]
        for iface in ("public", "internal", "admin"):
            call("POST", f"{ks}/endpoints", tok, {"endpoint": {
                "service_id": sid, "interface": iface, "region_id": "RegionOne",
                "url": f"{cinder_url}/v3/%(project_id)s", "enabled": True}})
    print(json.dumps({"projects": ids, "users": users, "roles": roles}))


def wait_volume_up(ks, admin_pass, host, timeout):
    deadline = time.monotonic() + float(timeout)
    tok, tokdoc = token(ks, "admin", admin_pass, "admin")
    url = [e["url"] for s in tokdoc["catalog"] if s["type"] == "volumev3"
           for e in s["endpoints"] if e["interface"] == "public"][0]
    last = None
    while time.monotonic() < deadline:
        try:
            _, _, doc = call("GET", f"{url}/os-services?binary=cinder-volume", tok)
            last = [(s["host"], s["state"]) for s in doc["services"]]
            if (host, "up") in last:
                # 'up' is only a heartbeat; the backend is usable once its
                # driver initialised and reported the pool to the scheduler
                _, _, doc = call("GET", f"{url}/scheduler-stats/get_pools", tok)
                last = [p["name"] for p in doc["pools"]]
                if f"{host}#lvm" in last:
                    print(f"cinder-volume {host} up, pool {host}#lvm reported")
                    return
        except (OSError, SystemExit) as e:  # cinder-api still starting
            last = str(e)
        time.sleep(1)
    raise SystemExit(f"cinder-volume {host} not up after {timeout}s; last: {last}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"catalog": catalog, "wait-volume-up": wait_volume_up}[cmd](*args)
