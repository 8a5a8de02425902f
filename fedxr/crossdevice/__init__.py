"""Devices that learn together: the student fine-tuned across many small devices with NVFlare's edge stack.

A cross-silo federation (``fedxr federate``) joins a handful of hospitals that each hold thousands of films and
train every round. Point-of-care devices are the other shape: thousands of laptops, boards and phones that
each see a few films, come and go, and run slowly. NVFlare 2.9's ``nvflare.edge`` serves them with buffered
asynchronous aggregation (FedBuff): the server hands out the current model version to whichever devices are
free, folds in every update that comes back (late ones too, up to a staleness limit) and makes a new version
once enough have arrived.

* :mod:`fedxr.crossdevice.population` — a site's training films dealt out to N simulated devices (5–50 each);
* :mod:`fedxr.crossdevice.device` — what one device does with a task (fedxr's ``DeviceTaskProcessor``): train the
  student a few local steps on its own films, or drop out, or answer late;
* :mod:`fedxr.crossdevice.server` — the server's model manager (NVFlare's ``BuffModelManager``) keeping every model
  version and counting the updates that made it: trained, dropped, stale, too old;
* :mod:`fedxr.crossdevice.run` — ``fedxr edge-federate RECIPE``: the job, run in NVFlare's simulator, and its report.
"""
