"""The paper's numbers that each protocol's report is put next to (Cox, Liu et al., Medical Image Analysis 2024).

All on the real data sets (BraTS 2021, 1,251 cases, official 5-fold split; ATLAS v2.0); see
``/work/shared/REFERENCE.md`` / ``docs/protocols.md``.
"""

from __future__ import annotations

#: Table 4 / 8: BraTS 2021 5-fold mean Dice (mean of TC, WT, ET) per fold, and 5-fold means of other models
BRATS_CV_FOLDS = {"BrainSegFounder-Small": [0.9032, 0.9182, 0.9121, 0.9100, 0.9139]}
BRATS_CV_MEANS = {
    "BrainSegFounder-Small": 0.9115,
    "Stage-1-only Small": 0.9110,
    "SwinUNETR from scratch": 0.8971,
    "nnU-Net": 0.908,
    "SegResNet": 0.907,
}
#: Table 9 / Figure 5: mean Dice over 5 random subsets, (BrainSegFounder, SwinUNETR from scratch), by % of training cases
FEWSHOT = {5: (0.7870, 0.7816), 10: (0.8758, 0.8670), 20: (0.8883, 0.8849), 40: (0.8948, 0.8937)}
#: Table 5: T1-only, 5-fold mean Dice
T1_ONLY = {"BrainSegFounder": 0.721, "SwinUNETR from scratch": 0.678}
#: Table 6: ATLAS v2.0 challenge metrics of BrainSegFounder
ATLAS = {"dice": 0.712, "lesionwise_f1": 0.711, "simple_lesion_count": 3.421, "volume_difference_mm3": 8993.85}
