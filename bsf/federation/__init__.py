"""Federated learning without NVFlare: what a site and the server compute (site training rounds, site
configuration, the initial global model, the stage graph, run-folder names, encoder export). ``bsf.fl`` wires these
into NVFlare; ``bsf.pipeline`` chains the stages.
"""
