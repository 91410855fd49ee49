"""The base config every experiment starts from, and variant parsing. Data only.

Every number of a run lives in the config, one section per owner: ``data``, ``model``,
``pretrain`` (stage 1), ``fl`` (stage 2), ``align`` (stage 3), ``eval``, ``checkpoint``,
``mesh``. Each section's owner validates it (``fedllava.main`` runs every validator before
anything is written). ``configs/X.py:if=50,algo=fedprox`` picks variants (big_vision's
``parse_arg``) and ``--config.fl.rounds=5`` overrides single fields. This module imports
nothing of fedllava.
"""

from __future__ import annotations

import ml_collections

# CLIP ViT-L/14-336: LLaVA-1.5's vision tower; the paper's zero-shot teacher for Eq. 6.
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
# LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B-v1.5), llava-hf layout: stage 1's teacher.
LLAVA_15_7B = "llava-hf/llava-1.5-7b-hf"


def parse_arg(arg: str | None, **defaults):
  """Parses ``"if=50,algo=fedprox,runlocal"`` into a ConfigDict over ``defaults``.

  A bare word sets a boolean flag to True; values are converted to the type of the default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config variant {key!r}; known: {sorted(defaults)}.")
    if not sep:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = type(defaults[key])(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the paper's CIFAR-10-LT setting (Sec. 4.1), following CReFF's code."""
  c = ml_collections.ConfigDict()
  c.name = "run"  # default workdir: workdirs/<name>
  c.seed = 7  # partition, sampling, init, augmentation (the long tail: data.longtail_seed)
  c.stages = "federate,align"  # chained in order; each writes under workdir/<stage>/
  c.workdir = ""  # set by --workdir

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
  # CIFAR missing from data_dir (else $TFDS_DATA_DIR, else ~/tensorflow_datasets): True downloads
  # it (after a quick check that the host answers), False never tries the network. Either way a
  # copy that cannot be had is one message before anything is written.
  c.data.download = True
  c.data.image_size = ml_collections.FieldReference(None, field_type=int)  # imagenet_lt only
  c.data.imbalance_factor = 100.0
  # CReFF fixes the long-tail subset with numpy seed 7 whatever --seed says; so do we, so a
  # seed sweep changes the partition, sampling and init but not the training pool. None:
  # follow config.seed.
  c.data.longtail_seed = ml_collections.FieldReference(7, field_type=int)
  c.data.partition = "creff"  # or "dirichlet" (Hsu et al. 2019, unequal sizes)
  c.data.dirichlet_alpha = 0.5
  c.data.crop_padding = 4
  c.data.flip = True
  c.data.per_batch_augment = False  # True reproduces CReFF (one crop/flip per batch)
  c.data.placement = "device"  # client data on device for the run, or "host" per round
  c.data.synthetic_examples = 1000

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet8"
  c.model.width = 64  # CReFF ResNet_cifar(resnet_size=8, scaling=4)
  c.model.mlp_dim = ml_collections.FieldReference(None, field_type=int)  # CLIP width
  c.model.head_on_mlp = False
  c.model.dtype = "float32"  # parameters (master weights); "float64" for the oracles
  c.model.compute_dtype = "float32"  # activations; "bfloat16" with float32 master weights
  # "xla" (nn.Conv), "im2col" or "shift" (patches x kernel, the patches from a one-hot conv or
  # from 9 strided slices), "eigen" (XLA's convolutions with hand-written forward-form gradients
  # that XLA:CPU keeps on Eigen inside the local-step scan): same parameters and results. "auto"
  # picks what the benchmarks measured faster (benchmarks/README.md): eigen on CPU (1.7x over
  # shift, which was 1.9x over im2col), xla on an H200 (5.1 s/round vs 8.7 with im2col).
  c.model.conv_impl = "auto"
  # How BN sums its batch statistics: "reduce" (XLA reductions) or "dot" (contractions with the
  # example mask, precision HIGHEST): same values up to rounding. "dot" was ~3% faster a local
  # step on CPU (benchmarks/README.md): too little to change the default's float32 rounding.
  c.model.bn_impl = "reduce"

  c.fl = ml_collections.ConfigDict()
  c.fl.algorithm = "fedavg"
  c.fl.num_clients = 20
  c.fl.clients_per_round = 8  # 40% of 20
  c.fl.rounds = 200
  c.fl.local_epochs = 10
  c.fl.batch_size = 32
  c.fl.learning_rate = 0.1
  c.fl.server_lr = 1.0
  c.fl.prox_mu = 0.01
  c.fl.server_momentum = 0.9
  # auto | vmap | map | group | chunked (rounds.py: equal results). "auto" takes what
  # benchmarks/fl_round.py measured fastest on the backend (fedllava/federate/rounds.py AUTO):
  # map on CPU and GPU; "chunked" for many unequal clients a round (README, 1000 clients).
  c.fl.client_parallelism = "auto"
  # Clients per vmapped chunk of "group" / "chunked"; 0: auto, the largest that fits the
  # device's memory (rounds.auto_group_size), printed at the first round.
  c.fl.group_size = 0
  # Each FL method's own hyperparameters (fedllava/algorithms/<name>.py says where each
  # default comes from).
  c.fl.fedadam = ml_collections.ConfigDict()  # also fedyogi; Reddi et al. 2021, Sec. 5 / App. D
  c.fl.fedadam.learning_rate = 0.01  # server step size eta
  c.fl.fedadam.b1 = 0.9
  c.fl.fedadam.b2 = 0.99
  c.fl.fedadam.tau = 1e-3  # adaptivity (Adam's eps)
  c.fl.fedfocal = ml_collections.ConfigDict()  # Sarkar et al. 2020; Lin et al. 2017
  c.fl.fedfocal.gamma = 2.0
  c.fl.fedfocal.alpha = 1.0  # one scalar for every class
  c.fl.taunorm = ml_collections.ConfigDict()  # Kang et al. 2020 (evaluation only)
  c.fl.taunorm.tau = 1.0
  c.fl.taunorm.keep_bias = False  # the authors' code drops the bias
  # FedDF, Lin et al. 2020 (epfml/federated-learning-public-code, FedDF-code).
  c.fl.feddf = ml_collections.ConfigDict()
  # A fixed budget: the code runs <= 10^4 steps with early stopping on a validation split the
  # FL protocol lacks; 1000 = the code's early-stopping patience (early_stopping_server_batches).
  c.fl.feddf.steps = 1000
  c.fl.feddf.batch_size = 128  # noise_knowledge_transfer.py aggregate(): batch_size=128
  c.fl.feddf.learning_rate = 1e-3  # Adam, cosine-annealed over the steps (the code's)
  c.fl.feddf.temperature = 1.0  # KL_temperature=1 (the code's default)
  c.fl.feddf.clip_norm = 5.0  # clip_grad_norm_(student, 5) in update_student
  # "unlabeled": the training images the long tail leaves out (held by no client, never the test
  # set), without labels; the paper uses other data sets (CIFAR-100, ImageNet32) instead.
  c.fl.feddf.server_data = "unlabeled"
  # FedBE, Chen & Chao 2021 (hongyouc/FedBE: utils/options.py, models/Update.py).
  c.fl.fedbe = ml_collections.ConfigDict()
  c.fl.fedbe.num_samples = 10  # --num_sample_teacher: models drawn from the Gaussian
  c.fl.fedbe.epochs = 20  # --server_ep: passes over the server data per round
  c.fl.fedbe.batch_size = 128  # --server_bs
  c.fl.fedbe.learning_rate = 1e-3  # set_opt: SGD lr 1e-3, momentum 0.9, weight decay 1e-5
  c.fl.fedbe.momentum = 0.9
  c.fl.fedbe.weight_decay = 1e-5
  c.fl.fedbe.swa_start = 500  # set_opt: SWA(swa_start=500, swa_freq=25)
  c.fl.fedbe.swa_every = 25  # 0 turns SWA off
  c.fl.fedbe.var_scale = 1.0  # the paper's Gaussian (the code: 0.1 on normalised updates)
  c.fl.fedbe.server_data = "unlabeled"  # as fl.feddf.server_data
  # CCVR (Luo et al. 2021): neither the paper nor code gives these; FL-bench's CCVR
  # (KarhouTam/FL-bench src/server/ccvr.py) is the source of each default.
  c.fl.ccvr = ml_collections.ConfigDict()
  c.fl.ccvr.num_virtual = 200  # virtual features per class (FL-bench sample_per_class)
  c.fl.ccvr.learning_rate = 0.1  # calibration SGD (FL-bench: the clients' lr; ours is 0.1)
  c.fl.ccvr.epochs = 1  # passes over the virtual features (FL-bench: one)
  c.fl.ccvr.batch_size = 32  # (FL-bench: the clients' batch size; ours is 32)
  # CReFF (Shang et al. 2022): shangxinyi/CReFF-FL options.py:16-22 and main.py:205.
  c.fl.creff = ml_collections.ConfigDict()
  c.fl.creff.num_features_per_class = 100  # --num_of_feature
  c.fl.creff.match_lr = 0.1  # --lr_feature (plain SGD on the federated features)
  c.fl.creff.match_steps = 100  # --match_epoch (steps a round)
  c.fl.creff.retrain_lr = 0.01  # --lr_net
  c.fl.creff.retrain_epochs = 300  # --crt_epoch
  c.fl.creff.batch_size = 32  # --batch_size_local_training (re-training batches)
  c.fl.creff.grad_batch = 32  # --batch_real (per class, min(32, N_c) examples)
  c.fl.creff.grad_repeats = 10  # main.py:205, gradients averaged over 10 batches
  # --method DSA (options.py:32-41, main.py:209-211): Differentiable Siamese Augmentation of
  # each gradient batch's real images, one strategy and one draw per batch; False: none.
  c.fl.creff.dsa = True
  c.fl.creff.dsa_strategy = "color_crop_cutout_flip_scale_rotate"  # --dsa_strategy
  # Client-level DP (fedllava/privacy.py): a wrapper around the chosen method's aggregation,
  # off by default. McMahan et al. 2018 (DP-FedAvg), Andrew et al. 2021 (adaptive clipping).
  c.fl.dp = ml_collections.ConfigDict()
  c.fl.dp.enabled = False  # off: the method runs exactly as without this section
  c.fl.dp.clip_norm = 1.0  # C, L2 over the whole update; model-dependent (McMahan et al. sweep
  # S); with adaptive_clip the initial clip (TFF's gaussian_adaptive starts at 0.1)
  c.fl.dp.noise_multiplier = 1.0  # z, noise std / C (McMahan et al.'s z = 1.0 setting)
  c.fl.dp.delta = 1e-5  # report epsilon at this delta; keep it below 1 / num_clients
  c.fl.dp.target_epsilon = 0.0  # > 0: calibrate z so fl.rounds rounds reach this epsilon
  c.fl.dp.epsilon_budget = 0.0  # > 0: stop before a round that would exceed it; 0: no stop
  c.fl.dp.noise_cohort_size = 0  # M (pfl-research): noise as for a cohort of M; 0: m
  c.fl.dp.accounting = "without_replacement"  # our sampler (replace-one); "poisson": literature
  c.fl.dp.adaptive_clip = False  # Andrew et al. 2021: C tracks a quantile of update norms
  c.fl.dp.target_quantile = 0.5  # gamma (Andrew et al. / TFF gaussian_adaptive default)
  c.fl.dp.clip_learning_rate = 0.2  # eta_C, geometric step (Andrew et al. / TFF default)
  c.fl.dp.clipped_count_stddev = 0.0  # sigma_b; 0: Andrew et al.'s cohort / 20
  # Ratio Loss, Wang et al. 2021 (balanced-fl/Addressing-Class-Imbalance-FL, models/Fed.py
  # whole_determination: weight_c = 1.0 + 0.1 * Ra_c).
  c.fl.ratioloss = ml_collections.ConfigDict()
  c.fl.ratioloss.alpha = 1.0
  c.fl.ratioloss.beta = 0.1
  # Labelled images per class at the server for the monitor, held out of the training split
  # before the long tail (no client holds them). The code draws them from the training set
  # (ratio_loss_data) without a count we could read; 10 = a small balanced set.
  c.fl.ratioloss.aux_per_class = 10
  # The monitor (main_nn.py: a LocalUpdate per class from the global model on that class's
  # auxiliary images; Fed.py: the change of fc1.weight). "train": the code's local training;
  # "gradient": one full-batch gradient at the global model (its first-order term; no decay).
  c.fl.ratioloss.monitor = "train"
  # SGD steps per class: the code's local_ep (options.py default 2) epochs of one batch each
  # (a class's auxiliary images fit one local_bs=64 batch).
  c.fl.ratioloss.monitor_steps = 2
  # None = the clients' config.fl.learning_rate (the code passes the clients' args.lr).
  c.fl.ratioloss.monitor_lr = ml_collections.FieldReference(None, field_type=float)
  c.fl.ratioloss.monitor_momentum = 0.9  # Update.py LocalUpdate.train: SGD momentum=0.9
  c.fl.ratioloss.monitor_weight_decay = 5e-4  # Update.py LocalUpdate.train: weight_decay=5e-4
  # CLIP2FL (shijiangming1/CLIP2FL options.py): CReFF's part from config.fl.creff (same values);
  # the teacher is config.align.teacher.
  c.fl.clip2fl = ml_collections.ConfigDict()
  c.fl.clip2fl.alpha = 1.0  # --alpha, Eq. 1's weight of the CLIP distillation
  c.fl.clip2fl.temperature = 3.0  # --T, KDLoss temperature
  c.fl.clip2fl.contrast_alpha = 0.001  # --contrast_alpha, Eq. 8's weight of the text contrast
  c.fl.clip2fl.tau = 0.1  # --ins_temp, SupConLoss_text temperature
  c.fl.clip2fl.templates = "default"  # main.py:478 uses one prompt, "a photo of a {c}"

  # Stage 1 (Sec. 3.1, Eq. 2; Sec. 4.1's recipe): annotate unlabeled images with the MLLM, then
  # Dynamic Weighted Pretraining of g_fl (backbone + feature MLP) inside the frozen LLaVA.
  # Only demanded when "annotate" or "pretrain" is in c.stages (fedllava/pretrain/train.py).
  c.pretrain = ml_collections.ConfigDict()
  # llava-hf checkpoint: a local directory, a hub name (Hugging Face cache / download), or
  # "random-tiny" (a tiny random LLaVA written into the stage's workdir: a mechanics check).
  c.pretrain.teacher = ""
  c.pretrain.tokenizer = ""  # "" = the teacher's own tokenizer (AutoTokenizer, no remote code)
  c.pretrain.teacher_dtype = "bfloat16"  # frozen CLIP / projector / LLM weights and compute
  c.pretrain.unlabeled_dir = ""  # stage "annotate": folder of unlabeled images (recursive)
  # stage "pretrain" without "annotate": LLaVA-format JSON (blip_laion_cc_sbu_558k.json, the
  # CC-595K chat.json) and the folder its "image" paths are relative to.
  c.pretrain.data_json = ""
  c.pretrain.image_dir = ""
  c.pretrain.template = "plain"  # "plain": <image> + caption (LLaVA pretraining); or "vicuna_v1"
  c.pretrain.max_length = 640  # tokens per sequence (576 image tokens + caption), padded/truncated
  c.pretrain.pad_to_square = False  # LLaVA-1.5's image_aspect_ratio="pad" (pretraining: False)
  c.pretrain.fl_image_size = ml_collections.FieldReference(None, field_type=int)  # None: data's
  c.pretrain.batch_size = 128  # Sec. 4.1 (global batch: accum_steps micro-batches of B/accum)
  c.pretrain.accum_steps = 16  # micro-batches of 8 per step: fits one 80 GB GPU with remat
  c.pretrain.epochs = 4  # Sec. 4.1
  c.pretrain.ramp_epochs = 2.0  # alpha: half cosine 0 -> 1 over these epochs, then 1 (Sec. 4.1)
  c.pretrain.learning_rate = 2e-3  # Sec. 4.1; AdamW, linear warm-up, cosine decay (LLaVA)
  c.pretrain.warmup_ratio = 0.03  # LLaVA's pretraining warm-up
  c.pretrain.weight_decay = 0.0  # LLaVA's pretraining value
  c.pretrain.max_steps = 0  # > 0: stop after this many steps (schedule unchanged; the report
  #                           says what fraction of the recipe ran)
  c.pretrain.remat = True  # per-layer remat of the frozen LLM (~62 -> ~2 GiB activations, 7B)
  c.pretrain.bad_examples = "skip"  # "skip" (drop, report ids) or "fail" (refuse the data)
  c.pretrain.check_images = "open"  # data check up front: "decode" | "open" | "none"
  c.pretrain.worker_count = 0  # grain worker processes (0: in the training process)
  c.pretrain.checkpoint_every = 500  # steps between orbax checkpoints (and the last step)
  c.pretrain.checkpoint_keep = 2
  c.pretrain.peak_tflops = 0.0  # device peak for MFU; 0: from the device kind (GPU), else none
  c.pretrain.demo = False  # offline mechanics check: digits PNGs + templated captions
  c.pretrain.demo_images = 256  # demo: digits training images written as the unlabeled folder
  c.pretrain.annotate = ml_collections.ConfigDict()
  c.pretrain.annotate.kinds = "conversation,detailed_description,complex_reasoning"  # Sec. 3.1
  c.pretrain.annotate.batch_size = 8  # prompts per generate call (fixed shape)
  c.pretrain.annotate.max_new_tokens = 128
  c.pretrain.annotate.prompt_len = 704  # prompt tokens (576 image tokens + system + question)
  c.pretrain.annotate.temperature = 0.0  # 0: greedy
  c.pretrain.annotate.template = "vicuna_v1"  # the prompt's conversation template
  # Table 4 / Fig. 3 (Sec. 4.3.1): central training on few-shot subsets, with/without stage 1.
  c.pretrain.fewshot = ml_collections.ConfigDict()
  c.pretrain.fewshot.fractions = "0.004,0.01,0.02"  # of the (balanced) training split
  c.pretrain.fewshot.epochs = 30
  c.pretrain.fewshot.target = 25.0  # top-1 (%) to reach (paper: CIFAR-10 25, CIFAR-100 15)
  c.pretrain.fewshot.batch_size = 32
  c.pretrain.fewshot.learning_rate = 0.01  # SGD with momentum 0.9 (the paper does not say)
  c.pretrain.fewshot.momentum = 0.9

  c.align = ml_collections.ConfigDict()  # stage 3, Eq. 5-6
  c.align.per_class = 10  # D_align: k images per class held out before the long tail
  c.align.data_dir = ""  # or a folder of labelled images, one sub-folder per class name
  c.align.teacher = CLIP_L14_336  # CLIP for q (hub name or local dir); "" = none (beta must be 0)
  c.align.templates = "cifar"  # prompt ensemble for q (data/classnames.py: default|cifar|imagenet)
  c.align.beta = 1.0  # weight of KL(q || p) in Eq. 6 (the paper does not give its value)
  c.align.temperature = 1.0  # T in KL(softmax(q/T) || softmax(p/T))
  c.align.params = "all"  # "all" (Eq. 5 moves w_agg) or "head" (the classifier only)
  c.align.when = "end"  # "end": once after the last round; "every_round": after each aggregation
  c.align.optimizer = "sgd"  # sgd | adam
  c.align.learning_rate = 0.01
  c.align.momentum = 0.9
  c.align.epochs = 5  # passes over D_align per alignment
  c.align.batch_size = 32
  c.align.bn = "train"  # "train": BN batch statistics (PyTorch model.train()); "frozen"
  c.align.cache_dir = ""  # where the zero-shot q cache lives ("" = workdir/align)

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 1
  c.eval.batch_size = 500

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.keep = 2

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0  # 0: all visible devices
  return c


def cifar_lt_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  """The paper's CIFAR-10/100-LT setting; variants ``if=``, ``algo=``, ``rounds=``, ``k=``
  (D_align images per class), ``beta=`` (Eq. 6), ``every_round`` (align after each round),
  ``pretrain`` (stage 1 first: DWP inside LLaVA-1.5-7B on LLaVA's 558K captions)."""
  a = parse_arg(
    arg,
    **{
      "if": 100.0,
      "algo": "fedavg",
      "rounds": 200,
      "k": 10,
      "beta": 1.0,
      "every_round": False,
      "pretrain": False,
    },
  )
  c = base_config()
  c.name = f"{dataset}_lt_if{a['if']:g}_{a.algo}"
  c.data.name = dataset
  c.data.imbalance_factor = a["if"]
  c.fl.algorithm = a.algo
  c.fl.rounds = a.rounds
  c.align.per_class = a.k
  c.align.beta = a.beta
  c.align.when = "every_round" if a.every_round else "end"
  c.pretrain.fewshot.target = 15.0 if dataset == "cifar100" else 25.0  # Table 4's thresholds
  if a.pretrain:
    c.name += "_pretrain"
    c.stages = "pretrain,federate,align"
    c.model.mlp_dim = 1024  # CLIP ViT-L/14-336's width (Eq. 2 blends in CLIP's feature space)
    c.pretrain.teacher = LLAVA_15_7B
    # LLaVA-1.5's pretraining set (LLaVA-Pretrain: blip_laion_cc_sbu_558k.json + images/);
    # the paper's CC-595K (LLaVA-CC3M-Pretrain-595K: chat.json + images) reads the same way.
    c.pretrain.data_json = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    c.pretrain.image_dir = "data/LLaVA-Pretrain/images"
  return c
