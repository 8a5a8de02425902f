"""The federation as NVFlare's server sees it, through the FLARE API with an admin startup kit.

With `fedxr console --startup-kit ADMIN_KIT` the home page lists the federation's jobs and connected
sites. The kit's own NVFlare role (project admin, org admin, lead, member) bounds what the server
answers; the console adds nothing the kit may not see. Answers are cached for a few seconds.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fedxr.federated.deploy import admin_username

CACHE_S = 5.0


class Federation:
    def __init__(self, startup_kit: str | Path, username: str | None = None, timeout_s: float = 5.0):
        self.kit = Path(startup_kit)
        # The name provisioning wrote into the kit (the certificate's CN): NVFlare refuses any other.
        self.username = username or admin_username(self.kit)
        self.timeout_s = timeout_s
        self._cache: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def status(self) -> dict:
        with self._lock:
            if self._cache and time.time() - self._cache[0] < CACHE_S:
                return self._cache[1]
            result = self._ask()
            self._cache = (time.time(), result)
            return result

    def _ask(self) -> dict:
        try:
            from nvflare.fuel.flare_api.flare_api import new_secure_session
        except ImportError:
            return {"error": "NVFlare is not installed here (pip install 'fedxr[train]')"}
        try:
            session = new_secure_session(self.username, str(self.kit), timeout=self.timeout_s)
        except Exception as exc:  # the FLARE API raises its own types for an unreachable or refusing server
            return {"error": f"cannot reach the federation with {self.kit}: {type(exc).__name__}: {exc}"}
        try:
            info = session.get_system_info()
            jobs = session.list_jobs(detailed=True, limit=20, reverse=True)
            return {"server": {"status": str(info.server_info.status)},
                    "sites": [{"name": c.name, "last_connect_time": c.last_connect_time} for c in info.client_info],
                    "jobs": [{"id": j.get("job_id"), "name": j.get("job_name") or j.get("name"),
                              "status": j.get("status"), "submitted": j.get("submit_time_iso") or j.get("submit_time")}
                             for j in jobs]}
        except Exception as exc:
            return {"error": f"the federation did not answer: {type(exc).__name__}: {exc}"}
        finally:
            session.close()
