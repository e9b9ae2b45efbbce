"""The three-stage pipeline's drivers: they walk the stage graph (:mod:`bsf.federation.stages`) and run each stage
in NVFlare's simulator (``bsf chain``), on a POC deployment (``bsf deploy poc``), as a resumed job (``bsf deploy
resume``) or as the one-site federation of the paper protocols, and report the results.
"""
