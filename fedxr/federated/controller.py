"""NVFlare's FedAvg controller with a deadline for each site's round and a quorum for each round.

NVFlare's FedAvg sends each round's task without a deadline, and it notices a hospital that vanished
(a crashed machine, a cut network) only when the server's heartbeat timeout runs out: 600 s by default,
and a setting of the server's startup kit, not of the job. Until then every round waits. Here a round's
task carries ``federated.timeout_s`` as its deadline: a site that has not answered by then is left out of
that round's aggregate, as a site whose task failed is, and the federation goes on while
``federated.min_clients`` sites answer. A round that fewer answer stops the federation with a message
that says so, instead of averaging what came back (or nothing).
"""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg


#: The words that end the server's log line of a round without quorum (fedxr.federated.run looks for them).
QUORUM_LOST = "so the federation stops here"


class SiteDeadlineFedAvg(FedAvg):
    def __init__(self, *args, site_timeout_s: int = 0, quorum: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.site_timeout_s = site_timeout_s
        self.quorum = quorum

    def send_model(self, *args, **kwargs):
        if self.site_timeout_s and not kwargs.get("timeout"):
            kwargs["timeout"] = self.site_timeout_s
        return super().send_model(*args, **kwargs)

    def _get_aggregated_result(self):
        if self.quorum and self._received_count < self.quorum:
            reason = (f"round {self.current_round}: {self._received_count} of {self._expected_count} sites answered "
                      f"(within federated.timeout_s = {self.site_timeout_s} s, or without an error); federated.min_clients "
                      f"is {self.quorum}, {QUORUM_LOST}; the sites' logs say why they did not answer")
            self.panic(reason)
            raise RuntimeError(reason)
        return super()._get_aggregated_result()


def with_site_deadline(controller: FedAvg, site_timeout_s: int, quorum: int) -> SiteDeadlineFedAvg:
    """The controller NVFlare's recipe built, as a :class:`SiteDeadlineFedAvg` with every argument it was built
    with (NVFlare writes a component into the job from its class and its attributes, so the recipe's own
    argument list need not be repeated here and stays NVFlare's)."""
    if type(controller) is not FedAvg:  # a subclass would silently lose its own behaviour
        raise TypeError(f"expected NVFlare's FedAvg controller, got {type(controller).__name__}")
    controller.__class__ = SiteDeadlineFedAvg
    controller.site_timeout_s = site_timeout_s
    controller.quorum = quorum
    return controller
