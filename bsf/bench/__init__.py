"""Benchmarks behind ``bsf bench``: one module per benchmark, the shared timing in :mod:`bsf.bench.harness`.

- ``ssl_step``: Stage 1/2 SSL step, fast vs the reference-style (public-code) step;
- ``finetune_step``: Stage 3 SwinUNETR step, fast vs reference, and gradient checkpointing at 2x batch;
- ``sliding_window``: whole-volume inference, project settings vs the public test settings;
- ``data_wait``: share of the training step spent waiting for the loader (real engine and loader);
- ``numerics``: loss over N steps, fast precision vs fp32, same data and augmentation;
- ``comm``: bytes per round (encoder vs whole model, float32 vs float16) and FedAvg with float16 differences.
"""
