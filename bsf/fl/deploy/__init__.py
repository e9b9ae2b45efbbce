"""Real NVFlare deployments: provisioned site kits and their policies, the privacy guard, POC runs.

Everything here talks to NVFlare's provisioning, POC and admin tools; the training itself stays in
:mod:`bsf.fl` (the jobs) and the rest of :mod:`bsf`.
"""
