"""NVFlare's FedAvg controller with a deadline for each site's round.

NVFlare's FedAvg sends each round's task without a deadline, and it notices a hospital that vanished
(a crashed machine, a cut network) only when the server's heartbeat timeout runs out: 600 s by default,
and a setting of the server's startup kit, not of the job. Until then every round waits. Here a round's
task carries ``federated.timeout_s`` as its deadline: a site that has not answered by then is left out of
that round's aggregate, as a site whose task failed is, and the federation goes on while ``min_clients``
still answer.
"""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg


class SiteDeadlineFedAvg(FedAvg):
    def __init__(self, *args, site_timeout_s: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.site_timeout_s = site_timeout_s

    def send_model(self, *args, **kwargs):
        if self.site_timeout_s and not kwargs.get("timeout"):
            kwargs["timeout"] = self.site_timeout_s
        return super().send_model(*args, **kwargs)


def with_site_deadline(controller: FedAvg, site_timeout_s: int) -> SiteDeadlineFedAvg:
    """The controller NVFlare's recipe built, as a :class:`SiteDeadlineFedAvg` with every argument it was built
    with (NVFlare writes a component into the job from its class and its attributes, so the recipe's own
    argument list need not be repeated here and stays NVFlare's)."""
    controller.__class__ = SiteDeadlineFedAvg
    controller.site_timeout_s = site_timeout_s
    return controller
