"""The paper's protocols as one-command experiments (``bsf experiment cv|fewshot|single-modality|atlas``).

Every protocol is a *plan* of Stage 3 runs (:class:`~bsf.experiments.runner.RunSpec`) executed by one
runner and summarised by one report module:

* :mod:`bsf.experiments.cases`: the experiment's cases (a datalist, or a data folder indexed on the fly),
  fold splits and seeded few-shot subsets;
* :mod:`bsf.experiments.runner`: each run is a resolved ``RunConfig`` in ``RUN_DIR/config.yaml``, trained
  by :func:`bsf.train.train`, scored by :func:`bsf.evaluate.evaluate` on its held-out cases, and finished
  when ``RUN_DIR/metrics.json`` exists (a rerun skips it; a half-finished run is redone from scratch);
* :mod:`bsf.experiments.report`: mean +- std tables (markdown) and PNG plots;
* one module per protocol: :mod:`~bsf.experiments.cv` (paper Tables 4 and 8),
  :mod:`~bsf.experiments.fewshot` (Figure 5, Table 9), :mod:`~bsf.experiments.single_modality` (Table 5),
  :mod:`~bsf.experiments.atlas` (Table 6); :mod:`~bsf.experiments.paper` holds the paper's numbers.
"""
