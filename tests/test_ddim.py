"""Schedule, timesteps, add_noise and the DDIM steps against diffusers' DDIMScheduler / DDIMInverseScheduler.

Both sides compute in float32 from the same inputs; agreement is required to 1e-6 relative (the
operations are the same few multiply-adds, so any larger gap is a different formula, not rounding).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffedit.configs import ScheduleConfig
from diffedit.ddim import NoiseSchedule, add_noise, ddim_inverse_step, ddim_step, step_size, timesteps

RTOL = 1e-6
PREDICTIONS = ["epsilon", "v_prediction"]


def reference_scheduler(prediction_type: str, inverse: bool = False):
    # SD's scheduler settings, spelled out (the hub's scheduler_config.json of SD 1.5 / 2.1).
    kwargs = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )
    return (DDIMInverseScheduler if inverse else DDIMScheduler)(**kwargs)


def schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
    return NoiseSchedule.from_config(ScheduleConfig(prediction_type=prediction_type))  # type: ignore[arg-type]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def test_alphas_cumprod_equal_diffusers() -> None:
    ref = reference_scheduler("epsilon")
    assert torch.equal(schedule().alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(schedule().final_alpha, ref.final_alpha_cumprod)


@pytest.mark.parametrize("steps", [1, 7, 10, 50, 100, 999, 1000])
def test_timesteps_equal_diffusers(steps: int) -> None:
    ref = reference_scheduler("epsilon")
    ref.set_timesteps(steps)
    assert timesteps(schedule(), steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("steps,strength", [(50, 0.5), (50, 0.8), (50, 1.0), (50, 0.0), (7, 0.3), (20, 0.55)])
def test_partial_timesteps_match_diffedit_pipeline(steps: int, strength: float) -> None:
    # The pipeline keeps the last int(steps * strength) timesteps (StableDiffusionDiffEditPipeline.get_timesteps).
    ref = reference_scheduler("epsilon")
    ref.set_timesteps(steps)
    kept = min(int(steps * strength), steps)
    assert timesteps(schedule(), steps, strength) == ref.timesteps[steps - kept :].tolist()


def test_paper_settings_give_the_documented_timesteps() -> None:
    assert timesteps(schedule(), 50, 0.5)[0] == 481  # mask noise level (DESIGN.md)
    inverse = sorted(timesteps(schedule(), 50, 0.8))
    assert inverse[0] == 1 and inverse[-1] == 781 and len(inverse) == 40


def test_add_noise_equals_diffusers() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 481, 999])
    assert_close(add_noise(schedule(), x0, noise, t), reference_scheduler("epsilon").add_noise(x0, noise, t))
    # a scalar timestep noises the whole batch at one level
    reference = reference_scheduler("epsilon").add_noise(x0, noise, torch.tensor([481]))
    assert_close(add_noise(schedule(), x0, noise, 481), reference)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_ddim_step_equals_diffusers(prediction_type: str, eta: float) -> None:
    steps = 10
    ref = reference_scheduler(prediction_type)
    ref.set_timesteps(steps)
    ts = timesteps(schedule(prediction_type), steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours_x, ref_x = x.clone(), x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t_cur in ts:  # the last step goes to t_next < 0: the final alpha
        out = torch.randn(2, 4, 8, 8, generator=g)
        t_next = t_cur - step_size(schedule(), steps)
        step = ddim_step(schedule(prediction_type), out, ours_x, t_cur, t_next, eta=eta, generator=g_ours)
        ref_out = ref.step(out, t_cur, ref_x, eta=eta, generator=g_ref)
        assert_close(step.x, ref_out.prev_sample, 1e-5)
        assert_close(step.pred_x0, ref_out.pred_original_sample, 1e-5)
        ours_x, ref_x = step.x, ref_out.prev_sample


def test_eta_noise_comes_from_the_generator() -> None:
    s, x = schedule(), torch.randn(1, 4, 8, 8)
    a = ddim_step(s, x, x, 501, 481, eta=1.0, generator=torch.Generator().manual_seed(3)).x
    b = ddim_step(s, x, x, 501, 481, eta=1.0, generator=torch.Generator().manual_seed(3)).x
    c = ddim_step(s, x, x, 501, 481, eta=1.0, generator=torch.Generator().manual_seed(4)).x
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_inverse_step_equals_diffusers(prediction_type: str) -> None:
    steps = 50
    ref = reference_scheduler(prediction_type, inverse=True)
    ref.set_timesteps(steps)
    ts = sorted(timesteps(schedule(prediction_type), steps, 0.8))
    g = torch.Generator().manual_seed(2)
    ours_x = ref_x = torch.randn(1, 4, 8, 8, generator=g)
    for t_next in ts:
        out = torch.randn(1, 4, 8, 8, generator=g)
        step = ddim_inverse_step(schedule(prediction_type), out, ours_x, t_next - step_size(schedule(), steps), t_next)
        ref_x_next = ref.step(out, t_next, ref_x).prev_sample
        assert_close(step.x, ref_x_next, 1e-5)
        ours_x, ref_x = step.x, ref_x_next


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_exact_model_makes_ddim_exact(prediction_type: str) -> None:
    """A property independent of any reference: given the true noise (or v) of the latent's own level,
    one DDIM step lands exactly on sqrt(abar') x0 + sqrt(1 - abar') eps, in both directions."""
    s = schedule(prediction_type)
    g = torch.Generator().manual_seed(9)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)

    def true_output(t: int) -> torch.Tensor:
        a = s.abar(t)
        return eps if prediction_type == "epsilon" else a**0.5 * eps - (1 - a) ** 0.5 * x0

    for t_cur, t_next in [(981, 961), (481, 1), (21, 1)]:
        x_cur, x_next = add_noise(s, x0, eps, t_cur), add_noise(s, x0, eps, t_next)
        assert_close(ddim_step(s, true_output(t_cur), x_cur, t_cur, t_next).x, x_next, 1e-5)
        assert_close(ddim_inverse_step(s, true_output(t_next), x_next, t_next, t_cur).x, x_cur, 1e-5)


@pytest.mark.parametrize(
    "call",
    [
        lambda: timesteps(schedule(), 0),
        lambda: timesteps(schedule(), 1001),
        lambda: timesteps(schedule(), 10.0),  # type: ignore[arg-type]
        lambda: timesteps(schedule(), 10, 1.5),
        lambda: ddim_step(schedule(), torch.zeros(1), torch.zeros(1), 1, 21),
        lambda: ddim_step(schedule(), torch.zeros(1), torch.zeros(1), 21, 1, eta=-1),
        lambda: ddim_step(schedule(), torch.zeros(1), torch.zeros(1), 21, 1, eta=1.5),  # DDIM eq. 16: NaN above 1
        lambda: ddim_inverse_step(schedule(), torch.zeros(1), torch.zeros(1), 21, 1),
        lambda: schedule().abar(1000),
    ],
)
def test_bad_arguments_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_sampler_of_a_v_model_equals_diffusers_ddim_loop(tokenizer_dir) -> None:
    """toy/train.py's text-to-image sampler (ddim_sample with the raw v output) against the loop of diffusers'
    StableDiffusionPipeline written out with its DDIMScheduler, on the same v-prediction weights and noise.
    (Before ddim_sample, train.py fed the converted eps into a step that reads v: wrong for exactly this model.)"""
    from diffedit.toy.train import sample

    from ._reference import diffusers_pipeline, relative_error
    from .conftest import make_tiny_model

    model = make_tiny_model(tokenizer_dir, "v_prediction", seed=3)
    pipe, prompts, steps, guidance = diffusers_pipeline(model), ["a red circle", "a blue square"], 8, 5.0
    ours = sample(model, prompts, torch.Generator().manual_seed(0), steps=steps, guidance=guidance)

    size = model.config.image_size // model.config.vae.downsample_factor
    x = torch.randn((2, model.config.unet.in_channels, size, size), generator=torch.Generator().manual_seed(0))
    context = torch.cat([model.encode_prompt([""] * 2).tokens, model.encode_prompt(prompts).tokens])
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            uncond, cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = pipe.scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        theirs = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert relative_error(ours, theirs) < 1e-5  # fp32 CPU: the same multiply-adds in another order
