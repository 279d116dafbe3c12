"""Architecture and scheduler configurations of the shipped ShapesWorld models.

Choices (measured on this 2-core CPU, see the ShapesWorld issue note):
- UNet over the 16x16x48 pixel-unshuffle space, block_out_channels (64, 128, 128), one layer
  per block, cross-attention at 16x16 and 8x8: 5.9 M parameters, about 60 training images/s
  in float32 (bf16 autocast was slower here, channels-last no faster).
- v-prediction on SD's scaled-linear betas rescaled to zero terminal SNR, "trailing" timesteps:
  with flat-colour scenes a non-zero terminal SNR leaks the background colour into x_T, and the
  model would learn to read the background from the noise instead of the prompt.
- The flow twin: rectified flow x_t = (1 - t) x0 + t eps, velocity target eps - x0, shift 3.
"""

from __future__ import annotations

DIFFUSION_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
)

FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

UNET = dict(
    sample_size=16,
    in_channels=48,
    out_channels=48,
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)

TEXT_HIDDEN = 64


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET)


def make_diffusion_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**DIFFUSION_SCHEDULER)


def make_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER)
