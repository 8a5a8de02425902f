"""The recipe rules of fedxr's privacy options: which combinations of DP, homomorphic encryption, NVFlare's
update filters, distillation, DDP and the training settings fedxr refuses, and why. The recipe model
(``fedxr.config``) reports these with every other problem of a recipe before anything runs; they live here,
beside the mechanisms they protect, so a change to DP or HE changes its rules in the same place."""

from __future__ import annotations

from typing import Any

from fedxr.devices import runs_ddp


def recipe_problems(recipe: Any) -> list[str]:
    """Every privacy rule a recipe (a ``fedxr.config.Recipe``) breaks, each saying what to change."""
    p, fed, m = recipe.privacy, recipe.federated, recipe.model
    problems: list[str] = []
    if p.dp and p.he:
        problems.append("privacy: dp and he together are not supported; choose one (dp protects against what "
                        "the model reveals, he against the server seeing a site's update)")
    if p.he and fed.env == "sim":
        problems.append("privacy.he: the simulator cannot run homomorphic encryption (its participants have no "
                        "provisioned TenSEAL keys); use federated.env: poc (one machine) or prod")
    if p.he and (fed.algorithm != "fedavg" or fed.fedbn):
        problems.append(f"privacy.he: NVFlare's encrypted aggregation is FedAvg only; set federated.algorithm: "
                        f"fedavg and federated.fedbn: false (got {fed.algorithm}{', fedbn' if fed.fedbn else ''})")
    if p.he and recipe.distill.students:
        problems.append("privacy.he: it covers the teacher's federation; distillation jobs carry the frozen teacher "
                        "beside the student, which NVFlare's encrypted aggregation cannot leave out. Set "
                        "distill.students: []")
    if p.filter != "none" and fed.algorithm not in ("fedavg", "fedprox"):
        problems.append(f"privacy.filter: {p.filter} filters weight differences, which fedxr sends with fedavg or "
                        f"fedprox; not with {fed.algorithm}")
    if p.filter != "none" and fed.cross_site_eval:
        problems.append(f"privacy.filter: {p.filter} filters training updates, but cross-site evaluation sends each "
                        "site's whole local model unfiltered; set federated.cross_site_eval: false")
    if p.filter != "none" and p.he:
        problems.append("privacy.filter with privacy.he: the server cannot check or use a filtered encrypted "
                        "update; choose one")
    if p.dp:
        if recipe.distill.students:
            problems.append("privacy.dp: it covers the teacher's training; distillation would train students on "
                            "site data without it. Set distill.students: [] (a DP teacher is exported as is)")
        if m.mixup or fed.fedbn:
            problems.append("privacy.dp: model.mixup and federated.fedbn mix images (or keep BatchNorm), which "
                            "per-image clipping cannot account for; set model.mixup: 0 and federated.fedbn: false")
        if m.compile or (isinstance(m.devices, int) and m.devices > 1) or runs_ddp(m.devices, m.strategy):
            problems.append("privacy.dp: Opacus trains one process per site, without DDP or torch.compile; set "
                            "model.compile: false, model.devices: 1 and model.strategy: auto")
        if fed.max_local_steps:
            problems.append("privacy.dp: federated.max_local_steps counts batches of data.batch_size, but a DP "
                            "site samples logical batches (privacy.dp.logical_batch_size) whose steps the budget "
                            "is planned for; set federated.local_steps (every site the same steps) instead")
        if m.norm == "batch":
            problems.append("privacy.dp: BatchNorm mixes the images of a batch, so no image's gradient can be "
                            "clipped alone; set model.norm: group (or auto)")
        if fed.algorithm != "fedavg":
            problems.append(f"privacy.dp: federated.algorithm {fed.algorithm} changes the gradient after Opacus "
                            "has clipped and noised it (or replaces it: FedProx's proximal term would be lost); "
                            "use fedavg")
        if m.precision == "16-mixed":
            problems.append("privacy.dp: model.precision 16-mixed scales the loss, and Opacus would clip each "
                            "image's scaled gradient; use 32-true or bf16-mixed")
        # Only a DP recipe imports the DP machinery (torch, Opacus): validating any other recipe stays light.
        from fedxr.models.registry import UnknownModelError
        from fedxr.privacy.dp import dp_problem

        try:
            why = dp_problem(m.name)
        except UnknownModelError:
            why = None  # reported with the model name itself
        if why:
            problems.append(f"privacy.dp: model.name {why}; choose resnet18, resnet50, convnext_tiny, "
                            "resnet18_quarter, resnet18_narrow, resnet18_eighth or tiny_cnn")
    return problems
