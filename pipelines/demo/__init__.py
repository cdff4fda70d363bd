"""The demo models shipped in assets/models/: their synthetic data (`data`), their build (`build`; rebuild with
`python -m pipelines.demo build --seed 0`), their held-out evaluation (`evaluate`) and the offline tokenizers and
image processor that let them, and the tests' tiny models, be saved without a download (`offline_tokenizers`).

May import: `emloc`, the run machine and the backends (a demo is trained and read through their code).
"""

from pipelines.runner.registry import DEMO_MODELS

FLUX_DIR, VLM_DIR = DEMO_MODELS["flux"], DEMO_MODELS["vlm"]
FLUX_SEQUENCE_LENGTH = 32  # T5 tokens the demo is sampled with by default (captions take ~8-11)
FLUX_MAX_SEQUENCE_LENGTH = 512  # the longest padding it is trained with: diffusers' default, and FLUX.1 [dev]'s
FLUX_SAMPLE_STEPS = 16  # denoising steps of the demo's evaluation (4, the backend's [schnell] default, works too)
VLM_IMAGE_SIZE, VLM_PATCH = 32, 4  # (32/4)² = 64 patches -> pixel shuffle 0.5 -> 16 image tokens

# What each demo suggests for a run on it: written into its demo.json ("suggested") by the build, and read from there
# by both the headless CLI's defaults and the app's (pipelines.runner.registry.demo_suggestions); flags win.
# InternVL, measured with the app's example data (8 mugs, 4 owners), batch 1, lr 1e-3: 30 steps taught 1 of the 4
# owners, 240 steps all 4 (emulator and corrected full model, seeds 0-2), in about 5 s on this CPU.
VLM_SUGGESTED_SETTINGS = {"steps": 240, "lr": 1e-3, "calibration_samples": 8, "checkpoint_every": 40}
# FLUX: the demo's own size, T5 length and sampling steps, and the training that teaches it a new subject from
# 4-5 photos (benchmarks/teach_rate.py; the measured rate is in the README's "Demo models"). Measured on 5 photos all
# framed alike (the "focused" placement), subject shown by the corrected full model on seeds 1000-1015: 600 steps of
# batch 2 at lr 2e-3, 14/16; 800 x 2 at 1e-3, 13/16; 1000 x 1 and 1200 x 1 at 1e-3, 12/16; 800 x 1 at 2e-3, 9/16 (one
# run each). On fresh photos that vary as a user's do (the "varied" placement, the app's example set now), photo seeds
# 0 (the app's example set) / 2029 / 2030 / 2031 / 2032 / 2033 / 2034, one run each:
# - uniform timesteps (the backend's default): 600 x 2 at 2e-3, 0 / 6 / 1; 1200 steps, - / 7 / 6; batch 4, - / 9 / 3;
#   rank 32, - / 8 / 2; flipped photos, - / 2 / 3; ratio 1 (no compression: the emulator is not what fails), - / 7 / 5.
# - What helped is where the steps sample the noise: a cross differs from a blob in its layout, which the noisiest
#   steps draw, while uniform sampling spends most steps on finer ones. Logit-normal timesteps centred at -1.5 (86%
#   of them at σ > 0.6, median 0.82), 1200 steps: rank 16, 6 / 12 / 12 / 12 / 13 / 8 / 10; rank 32, 13 / 12 / 13 / 13 /
#   10 / 7 / 15; rank 16 batch 4, 10 / 14 / 9 / 15 / 13; rank 32 batch 4 (the suggestion: twice the time a step),
#   11 / 12 / 14 / 14 / 14 / 13 / 12. Centred at -0.7, rank 16: - / 12 / 12 / 11 / 10; at -2.5, 5 / 8; rank 16 at 600
#   steps, - / 12 / 8; 1500 steps, 4 / 11 / 13 / 14 / 12.
FLUX_SUGGESTED_SETTINGS = {"steps": 1200, "lr": 2e-3, "batch_size": 4, "rank": 32, "alpha": 32.0,
                           "calibration_samples": 8, "checkpoint_every": 200, "resolution": 64,
                           "max_sequence_length": FLUX_SEQUENCE_LENGTH, "preview_steps": FLUX_SAMPLE_STEPS,
                           "weighting_scheme": "logit_normal", "logit_mean": -1.5}
