"""The config's sections: one dataclass per section and per model kind, defaults equal to the papers' values.

The dataclass defaults are the values of Ho et al. 2020 (the CIFAR-10 model); the ready configs in
``ddpmlab/configs/`` override them for quick runs.  Each field's comment is its documentation (the
config reference and ``ddpm train --print-config`` show it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ddpmlab.config.adapt_sections import ControlNetConfig, FinetuneConfig, LoRAConfig

CONFIG_VERSION = 1
BUNDLED_DIR = Path(__file__).parent.parent / "configs"
SECTIONS = ("data", "model", "unet", "dit", "mlp", "diffwave", "diffusion", "train", "autoencoder", "distill", "reflow",
            "text", "finetune", "lora", "controlnet")
# keys of an earlier spelling -> their names now (read with a one-line note; runs are saved in the new one)
RENAMED_KEYS = {
    **{f"model.{k}": f"unet.{k}" for k in ("base_channels", "channel_mults", "num_res_blocks",
                                            "attention_resolutions", "dropout", "num_heads", "norm_groups")},
    **{f"model.{k}": f"mlp.{k}" for k in ("hidden", "num_layers", "time_embed_dim")},
    "model.preset": "dit.preset", "model.dit_depth": "dit.depth", "model.dit_hidden": "dit.hidden",
    "model.dit_heads": "dit.heads", "model.patch_size": "dit.patch_size", "model.mlp_ratio": "dit.mlp_ratio",
}
STAGES = ("diffusion", "autoencoder")  # what a run trains: a denoiser (ddpm train) or ddpm train-autoencoder


@dataclass
class DataConfig:
    # mnist | digits | toy | folder (images) | audio (a folder of WAV, FLAC or OGG files) | webdataset (WebDataset
    # tar shards of images, streamed: ddpm data shards writes them)
    dataset: str = "mnist"
    # image folder (dataset=folder), sound folder (dataset=audio), or shards (dataset=webdataset): a folder of .tar
    # files or a pattern such as shards/train-{000000..000099}.tar (http(s):// and pipe:COMMAND too)
    path: Optional[str] = None
    image_size: list = field(default_factory=lambda: [32, 32])  # [H, W]; ignored by mnist/digits/toy/audio
    channels: int = 3  # 1 (grayscale), 3 (RGB) or 4 (RGBA) for folders; sound: 1 (mono) or 2 (stereo)
    toy: str = "swiss_roll"  # swiss_roll | moons | s_curve | ring (dataset=toy)
    toy_samples: int = 10000  # points drawn from the toy distribution
    toy_noise: float = 0.0  # std of Gaussian noise added to the toy points
    split: str = "all"  # all | train | test (bundled MNIST/digits: a fixed 90/10 split)
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    # super-resolution (model.condition=low_res): [H, W] (or one number) of the low-res input, made
    # from each training image on the fly
    low_res: Optional[list] = None
    downsample: str = "area"  # super-resolution: how the low-res input is made: area (block means) | bicubic
    upsample: str = "bicubic"  # super-resolution: how it returns to the image size: bicubic | bilinear | nearest
    # sound (dataset=audio): clips are resampled to this rate in Hz (SC09 and the DiffWave paper's digits: 16000)
    sample_rate: int = 16000
    length: int = 16000  # sound: samples per clip; longer clips keep their start, shorter ones end in silence
    # a vocoder (model.condition=mel): each training step reads a random segment of this many samples of every
    # clip of its batch (DiffWave's training on short segments: more clips per step for the same work); null: all
    crop: Optional[int] = None
    # sound: the mel spectrogram (pictures, DiffWave's local conditioner, mel images; Kong et al. 2021: 80 bands,
    # FFT and window 1024, hop 256), Slaney's mel scale between f_min and f_max (null: sample_rate / 2)
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 80
    f_min: float = 20.0
    f_max: Optional[float] = None
    representation: str = "wave"  # sound: wave (model.kind=diffwave) | mel (each clip's log-mel image, for a UNet)
    mel_range: list = field(default_factory=lambda: [-10.0, 2.0])  # mel: the ln(mel) range mapped to [-1, 1]
    vocoder: Optional[str] = None  # mel: a vocoder run (model.condition=mel) to make sound; null: Griffin-Lim


@dataclass
class ModelConfig:
    """The denoiser: its kind (sized in the section of that name) and what it is conditioned on."""

    # unet | mlp | dit (diffusion transformer, Peebles & Xie 2023) | diffwave (sound, Kong et al. 2021): sized in
    # unet.*, mlp.*, dit.*, diffwave.*
    kind: str = "unet"
    num_classes: Optional[int] = None  # class embedding for conditional models
    # none | low_res: super-resolution, the upsampled low-res image (data.low_res) concatenated to x_t as
    # extra input channels (SR3, Saharia et al. 2021); sample with `ddpm upscale RUN --image low.png` |
    # mel: a vocoder (sound, model.kind=diffwave): each clip's log-mel spectrogram (data.n_fft, hop_length,
    # n_mels, f_min, f_max) through DiffWave's local conditioner (Kong et al. 2021); `ddpm vocode RUN --audio a.wav`
    condition: str = "none"
    # latent diffusion (Rombach et al. 2022): a run of `ddpm train-autoencoder` or a local diffusers
    # AutoencoderKL folder (e.g. Stable Diffusion's VAE); the denoiser then works on its latents
    autoencoder: Optional[str] = None
    # recompute activations in the backward pass (UNet ResBlocks/attention, DiT blocks):
    # less memory, one more forward pass of each block per training step
    gradient_checkpointing: bool = False


@dataclass
class UNetConfig:
    """The UNet of model.kind=unet (Ho et al. 2020, App. B)."""

    base_channels: int = 128  # channels at full resolution
    channel_mults: list = field(default_factory=lambda: [1, 2, 2, 2])  # per resolution; each after the 1st halves H, W
    num_res_blocks: int = 2  # residual blocks per resolution
    attention_resolutions: list = field(default_factory=lambda: [16])  # feature-map heights with attention
    dropout: float = 0.1  # dropout in the residual blocks
    num_heads: int = 1  # attention heads
    norm_groups: int = 32  # GroupNorm groups
    # text conditioning (Rombach et al. 2022, Sec. 3.3): the width of the token embeddings the UNet
    # cross-attends to; its attention blocks (and the middle block's) become Stable Diffusion's transformer
    # blocks (self-attention, cross-attention, GEGLU feed-forward). null: no cross-attention
    context_dim: Optional[int] = None
    transformer_depth: int = 1  # transformer layers in each attention block (with unet.context_dim)
    # the width of a pooled text embedding added to the time embedding (SDXL's add-embedding); null: none
    pooled_dim: Optional[int] = None
    # with unet.context_dim: add the fixed 2-D sin-cos embedding of each position to the transformer blocks' tokens,
    # so cross-attention knows where each pixel is ("on the left" learnt in a short run; not in Stable Diffusion,
    # so such a run does not export to diffusers)
    positions: bool = False


@dataclass
class DiTConfig:
    """The diffusion transformer of model.kind=dit (Peebles & Xie 2023)."""

    # a size of Table 1: DiT-S/2 ... DiT-XL/8 (S, B, L, XL with patch 2, 4 or 8); sets depth, hidden,
    # heads and patch_size (null: give those four keys)
    preset: Optional[str] = None
    depth: Optional[int] = None  # transformer blocks (null: from dit.preset)
    hidden: Optional[int] = None  # token width (null: from dit.preset)
    heads: Optional[int] = None  # attention heads (null: from dit.preset)
    patch_size: Optional[int] = None  # side p of the square patches, H*W/p^2 tokens (null: from dit.preset)
    mlp_ratio: float = 4.0  # MLP width / token width
    # text conditioning: the width of the token embeddings the DiT cross-attends to; its blocks become
    # PixArt-alpha's (self-attention, cross-attention, MLP, with adaLN-single; Chen et al. 2023, Sec. 2.3).
    # null: the class-conditional DiT of Peebles & Xie
    context_dim: Optional[int] = None
    pooled_dim: Optional[int] = None  # the width of a pooled text embedding added to the time embedding; null: none


@dataclass
class MLPConfig:
    """The MLP of model.kind=mlp (2-D toy data)."""

    hidden: int = 256  # hidden width
    num_layers: int = 4  # hidden layers
    time_embed_dim: int = 128  # size of the timestep embedding


@dataclass
class DiffWaveConfig:
    """The DiffWave of model.kind=diffwave (Kong et al. 2021): waveforms of data.dataset=audio."""

    # base (30 layers, 64 channels, dilation cycle 10: DiffWave_BASE) | large (the same with 128 channels:
    # DiffWave_LARGE) | small (12 layers, 32 channels, cycle 6: a CPU one); null: diffwave.layers, channels
    # and dilation_cycle (each null one: base's)
    preset: Optional[str] = None
    layers: Optional[int] = None  # residual layers (null: from diffwave.preset)
    channels: Optional[int] = None  # residual channels C (null: from diffwave.preset)
    dilation_cycle: Optional[int] = None  # layer i has dilation 2^(i mod cycle) (null: from diffwave.preset)
    embed_dim: int = 512  # width of the diffusion-step embedding's two FC + swish layers
    label_dim: int = 128  # the global conditioner's label embedding (class-conditional runs)
    # the local conditioner's time upsampling: the strides of its two transposed 2-D convolutions; their
    # product is data.hop_length (16 x 16 = 256)
    upsample: list = field(default_factory=lambda: [16, 16])


@dataclass
class DiffusionConfig:
    # ddpm (Ho et al. 2020) | flow: flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023),
    # x_t = (1 - t) x_0 + t eps with continuous t in [0, 1], the network (prediction velocity) learning
    # eps - x_0 at time input t * num_timesteps; diffusion.schedule and beta_* do not apply to it
    process: str = "ddpm"
    schedule: str = "linear"  # linear | cosine | sigmoid | tanh | quadratic
    num_timesteps: int = 1000  # T, the steps of the forward process (flow: the scale of the network's time input)
    beta_start: float = 1e-4  # beta_1 (all schedules but cosine)
    beta_end: float = 0.02  # beta_T (all schedules but cosine)
    # eps | x0 | v | edm (the network inside EDM's preconditioning, Karras et al. 2022, with the
    # loss weight 1 / c_out^2 that gives every noise level a unit-variance target) | velocity (eps - x_0:
    # process flow's, and only its)
    prediction: str = "eps"
    sigma_data: float = 0.5  # prediction edm: the data's standard deviation (EDM: 0.5 for images in [-1, 1])
    loss: str = "l2"  # l2 | l1
    # reverse variance sigma_t^2: beta_t (fixed_large), beta_tilde_t (fixed_small) or learned
    # between the two (learned_range, Nichol & Dhariwal 2021; doubles the model's output)
    variance: str = "fixed_large"
    loss_type: str = "simple"  # simple (L_simple) | hybrid (L_simple + vlb_weight * L_vlb) | vlb
    vlb_weight: float = 0.001  # lambda of the hybrid loss
    min_snr_gamma: Optional[float] = None  # min-SNR-gamma weighting of L_simple (Hang et al. 2023), e.g. 5.0
    # uniform | importance (loss_type vlb only) | lognormal: ln sigma_t ~ N(lognormal_mean, lognormal_std^2),
    # the nearest timestep taken (EDM's noise-level distribution, Karras et al. 2022, Sec. 5);
    # process flow: uniform | logit_normal (Esser et al. 2024, Eq. 19) | mode (their Eq. 20)
    t_sampling: str = "uniform"
    lognormal_mean: float = -1.2  # t_sampling lognormal: P_mean
    lognormal_std: float = 1.2  # t_sampling lognormal: P_std
    logit_normal_mean: float = 0.0  # t_sampling logit_normal: location m of logit(t) ~ N(m, s^2) (SD3: 0)
    logit_normal_std: float = 1.0  # t_sampling logit_normal: scale s (SD3: 1)
    mode_scale: float = 1.29  # t_sampling mode: s of f_mode(u; s), in [-1, 2 / (pi - 2)] (SD3's best: 1.29)
    # process flow: the shift s of the flow samplers' step schedule, t' = s t / (1 + (s - 1) t) (SD3,
    # Esser et al. 2024, Sec. 5.3.2: 3.0 at 1024^2); 1 keeps it uniform in t
    flow_shift: float = 1.0
    # rescale the betas so that alpha_bar_T = 0 (Lin et al. 2024): needs prediction v or x0
    zero_terminal_snr: bool = False
    # training noise eps + offset_noise * N(0, 1) per image and channel (Guttenberg 2023), e.g. 0.1:
    # lets the model change an image's mean brightness; 0 is the paper's N(0, I)
    offset_noise: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 800000  # optimiser steps
    # wall-clock budget of the whole run in minutes (set-up, training, the sample drawings of
    # train.sample_every and the final one; not train.eval_every), or null: after 40 steps the measured
    # speed fixes train.steps (at most its value above) so the run fits; the fitted steps go to
    # RUN/config.yaml (resume continues them); a faster machine trains longer
    minutes: Optional[float] = None
    batch_size: int = 128  # global batch (all processes together)
    lr: float = 2e-4  # AdamW learning rate after warm-up
    warmup_steps: int = 5000  # linear learning-rate warm-up
    # after the warm-up: constant (Ho et al. 2020), or cosine / linear decay to 0 at train.steps
    lr_schedule: str = "constant"
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW [beta1, beta2]
    grad_clip: float = 1.0  # clip the gradient norm at this value (0: no clipping)
    ema_decay: float = 0.9999  # decay of the EMA of the weights that sampling uses
    ema_start: int = 0  # first step at which EMA updates (before: EMA copies the weights)
    ema_every: int = 1  # update the EMA every k steps
    # power-function EMAs (Karras et al. 2024) of these relative widths, e.g. [0.05, 0.1]: their
    # snapshots (RUN/ema/, every ema_snapshot_every steps; 0: at every checkpoint) let
    # `ddpm ema RUN --sigma-rel S` build the EMA of any width after training
    ema_profiles: list = field(default_factory=list)
    ema_snapshot_every: int = 0
    seed: int = 0  # seeds weights, batches, noise and samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16
    # or AMX), fp32 elsewhere | no (fp32) | bf16 (CPU and CUDA) | fp16 (CUDA, with a loss scaler)
    mixed_precision: str = "auto"
    grad_accum_steps: int = 1  # split each process's share of train.batch_size into this many micro-batches
    # CPU (Linux): freed tensor memory stays in the process for the next step instead of going back
    # to the kernel (ddpmlab.training.allocator): no page faults per step; the process keeps its peak memory
    keep_freed_memory: bool = True
    log_every: int = 50  # steps between rows of RUN/log.csv
    sample_every: int = 0  # steps between sample drawings (0: only at the end)
    save_every: int = 5000  # steps between checkpoints
    sample_n: int = 64  # samples drawn at each sample_every
    # sampler of those samples (and of `ddpm sample RUN`); null: the process's own (ddim for ddpm,
    # flow_euler for flow)
    sample_sampler: Optional[str] = None
    sample_steps: int = 100  # steps of that sampler
    out_dir: str = "runs"  # folder that holds the run directories
    name: Optional[str] = None  # run-directory name; default: <dataset>-<timestamp>
    # class-conditional models: P(label -> "no label") per example, so the same network also
    # learns the unconditional model classifier-free guidance needs (Ho & Salimans 2022)
    label_dropout: float = 0.1
    # class-conditional runs: the guidance scale of the run's samples (training's drawings and
    # evaluations, and the default of `ddpm sample/eval/demo` on the run; --guidance overrides,
    # 0 is the unconditional model); null: conditional samples without guidance (scale 1).
    # Unconditional runs have nothing to guide and ignore it.
    sample_guidance: Optional[float] = None
    keep_checkpoints: int = 3  # checkpoints kept in RUN/checkpoints (the newest K)
    max_bad_steps: int = 20  # stop after this many steps in a row with a non-finite loss/gradient
    # evaluation during training (ddpmlab.evaluate): every eval_every steps (0: never) the EMA
    # model draws eval_n samples; metrics go to RUN/eval.csv and TensorBoard
    eval_every: int = 0
    eval_n: int = 500  # samples per evaluation
    eval_metrics: list = field(default_factory=list)  # empty: fid,kid,is,pr for images, swd,mmd for 2D
    eval_sampler: str = "ddim"  # sampler of the evaluation samples
    eval_steps: int = 50  # steps of that sampler
    eval_inception_weights: Optional[str] = None  # FID Inception-v3 weights file; default: the MNIST classifier
    tensorboard: bool = True  # event files in RUN/tensorboard (tensorboard --logdir runs)
    # super-resolution: conditioning augmentation (Ho et al. 2022, Sec. 4.1), Gaussian noise of std
    # s ~ U[0, cond_noise] per image added to the upsampled low-res input in training (0: none)
    cond_noise: float = 0.0


@dataclass
class AutoencoderConfig:
    """The first stage of latent diffusion (ddpm train-autoencoder; Rombach et al. 2022, App. G)."""

    block_out_channels: list = field(default_factory=lambda: [32, 64, 64])  # per level; each after the 1st halves H, W
    latent_channels: int = 4  # channels c of the latent z (B, c, H/f, W/f)
    layers_per_block: int = 1  # residual blocks per level
    norm_groups: int = 32  # GroupNorm groups (must divide every block_out_channels entry)
    loss: str = "l1"  # reconstruction loss: l1 | l2
    # weight of KL(q(z|x) || N(0, I)) summed over latent dims against the reconstruction loss summed
    # over pixels (Rombach et al. 2022 use 1e-6)
    kl_weight: float = 1e-6
    discriminator: bool = False  # add a PatchGAN with hinge loss (Esser et al. 2021)
    disc_start: int = 2000  # first step of the adversarial loss
    disc_weight: float = 0.5  # its weight (times the adaptive weight, when disc_adaptive)
    disc_adaptive: bool = True  # weight ||grad rec|| / ||grad adv|| at the decoder's last layer (Esser et al. Eq. 7)
    disc_channels: int = 64  # PatchGAN channels of the first layer
    disc_layers: int = 3  # PatchGAN stride-2 layers
    holdout: float = 0.05  # fraction of the data held out of training, for the final reconstruction PSNR
    stats_n: int = 4096  # training images encoded at the end for the latent mean / std (the scale factor)


@dataclass
class DistillConfig:
    """A few-step student of a teacher run (ddpm distill; Salimans & Ho 2022, Song et al. 2023)."""

    teacher: Optional[str] = None  # the teacher run folder (set by ddpm distill); null: the run is no student
    method: str = "progressive"  # progressive (Salimans & Ho 2022) | consistency (Song et al. 2023)
    steps: int = 4  # the student's sampling steps (progressive: a power of two, where the halving stops)
    # the student's parameterisation: v | x0 (eps fails at few steps: Salimans & Ho 2022, Sec. 4); velocity for a flow
    prediction: str = "v"
    # progressive: the teacher's DDIM steps in the first round (a power of two above distill.steps); rounds halve it
    teacher_steps: int = 64
    # progressive: iterations of each round (the last value repeats); consistency: the first value, in all
    iterations: list = field(default_factory=lambda: [2000])
    batch_size: int = 128  # examples per iteration
    lr: float = 1e-4  # Adam learning rate (constant; progressive: the optimizer restarts each round)
    ema_decay: float = 0.999  # EMA of the student's weights that sampling uses (warm-up min(decay, (1+k)/(10+k)))
    solver: str = "heun"  # consistency: the teacher's ODE step from sigma_n+1 to sigma_n: heun | euler (DDIM)
    target_ema: float = 0.95  # consistency: EMA decay of the target network theta^- (0: the student, stop-gradient)
    n_start: int = 10  # consistency: discretisation N at the start of the curriculum (Song & Dhariwal 2023)
    n_end: int = 80  # consistency: N at its end (N doubles in equal stages)
    # consistency: weight of each pair: inverse_step (1 / (sigma_n+1 - sigma_n), Song & Dhariwal 2023) | uniform
    weighting: str = "inverse_step"
    sigma_data: float = 0.5  # consistency: sigma_data of c_skip (0.5 for images in [-1, 1])
    rho: float = 7.0  # consistency: rho of the Karras noise levels
    huber_c: Optional[float] = None  # consistency: pseudo-Huber c (null: 0.00054 sqrt(d), Song & Dhariwal 2023)


@dataclass
class ReflowConfig:
    """A flow run retrained on its teacher flow's own (noise, sample) pairs (ddpm reflow; Liu et al. 2023,
    Algorithm 1): straighter paths, samples in 1 or 2 Euler steps."""

    teacher: Optional[str] = None  # the teacher flow run (set by ddpm reflow); null: the run is no reflow
    pairs: int = 10000  # (noise, sample) pairs the teacher's ODE draws (RUN/pairs)
    # the teacher's deterministic sampler for the pairs; null: its train.sample_sampler (flow_euler where that
    # is null; a reflow teacher: the sampler of its own pairs)
    sampler: Optional[str] = None
    steps: Optional[int] = None  # its steps; null: the teacher's train.sample_steps (a reflow teacher: its pairs')
    # class-conditional teachers: the guidance scale of the pairs (baked in: the reflowed run samples without);
    # null: the teacher's train.sample_guidance
    guidance: Optional[float] = None
    chunk: int = 1000  # pairs per file of RUN/pairs (a crash loses at most the one being drawn)


@dataclass
class TextConfig:
    """Text conditioning: the captions of an image folder (metadata.jsonl or .txt files; ddpmlab.data.captions)
    and the text encoder that reads them."""

    # null: no text conditioning | own: a small transformer trained with the denoiser (GLIDE, Nichol et al.
    # 2022), its tokenizer built from the captions (RUN/tokenizer.json) | a local folder of a Hugging Face
    # CLIPTextModel, CLIPTextModelWithProjection or T5EncoderModel with its tokenizer: frozen, its caption
    # embeddings cached on disk. Set, data.path is read with its captions (images without one are skipped)
    encoder: Optional[str] = None
    # tokens a caption is read to, start and end tokens included (CLIP's context: 77); a longer prompt is
    # truncated with a warning
    max_length: int = 77
    # classifier-free guidance: the share of training captions replaced by the empty caption, the
    # unconditional prompt (Stable Diffusion 1.x: 0.1; GLIDE: 0.2)
    caption_dropout: float = 0.1
    # the share of single words left out of the other training captions ("a red square" also read as "a square",
    # "red square"), so each word's meaning is also learnt apart from the words it came with. An own encoder, or a
    # frozen one with text.cache false
    word_dropout: float = 0.0
    vocab_size: int = 10000  # own: the tokenizer's words at most (special tokens included); rarer ones read as [UNK]
    # own: the token width D (GLIDE: 2048, Nichol et al. 2022, Sec. 4; its released small model: 512)
    width: int = 512
    depth: int = 4  # own: pre-LN transformer blocks (GLIDE: 24; its released small model: 16); 0: a bag of words
    heads: int = 8  # own: attention heads, dividing text.width (GLIDE's small model: 8)
    # own: the pooled embedding added to the time embedding: eos (the [EOS] token's output, GLIDE's) | mean (the
    # mean of the real tokens' outputs, Imagen's mean pooling, Saharia et al. 2022, Sec. 2.2: every word reaches
    # the time embedding directly, which a short run learns faster)
    pooling: str = "eos"
    cache: bool = True  # a frozen encoder: caption embeddings computed once and cached (<cache dir>/text)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    diffwave: DiffWaveConfig = field(default_factory=DiffWaveConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    text: TextConfig = field(default_factory=TextConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    version: int = CONFIG_VERSION
    stage: str = "diffusion"  # diffusion | autoencoder (written by ddpm train-autoencoder)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# model.condition: super-resolution (data.downsample, data.upsample) or a vocoder (ddpmlab.models.conditioned)
CONDITIONS = ("none", "low_res", "mel")
DOWNSAMPLE_MODES = ("area", "bicubic")
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")
DATASETS = ("mnist", "digits", "toy", "folder", "audio", "webdataset")  # data.dataset (ddpmlab.data.build_dataset)
# distillation (distill.method, distill.prediction, distill.solver; ddpmlab.samplers.student)
DISTILL_METHODS = ("progressive", "consistency")
STUDENT_PREDICTIONS = ("v", "x0", "velocity")  # velocity: the student of a flow teacher
ODE_SOLVERS = ("heun", "euler")
FINETUNE_METHODS = ("full", "lora", "textual-inversion", "dreambooth")  # finetune.method (ddpmlab.training.tasks.finetune)
CONTROL_DETECTORS = ("edges", "mask", "scribble", "blur")  # controlnet.detector (ddpmlab.data.control)

