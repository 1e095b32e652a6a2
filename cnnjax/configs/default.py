"""Default preset: Fashion-MNIST with the Keras tutorial CNN, on a 2-core CPU in minutes.

Run:
    python -m cnnjax.train                       # into checkpoints/default
    python -m cnnjax.train --config=default --workdir=/tmp/fmnist --config.num_epochs=3

Reaches ~92-93% test accuracy (docs/results.md has the measured figure and time).
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    # The model: a registry name plus any of its attributes, each settable from the command line
    # (--config.model.name=resnet18 --config.model.small_input=True; --config.model=NAME is
    # short for --config.model.name=NAME) and checked against the model before anything runs.
    c.model = ConfigDict({"name": "simple_cnn"})
    c.dataset = "fashion_mnist"
    c.dtype = "float32"  # compute dtype; params, optimizer state and BN statistics stay float32
    # CPU convolutions: auto | xla | onednn (cnnjax/nn/kernels; auto defers to $CNNJAX_CONV, else
    # picks the one measured faster). config.json records what ran: xla or onednn.
    c.conv_backend = "auto"
    # Rematerialisation: recompute activations in the backward pass instead of keeping them,
    # trading step time for memory (larger batches or models); parameters, checkpoints and
    # gradients are unchanged. none | blocks (each repeated block of the model: residual,
    # bottleneck, inverted residual, MBConv, dense layer, inception, ConvNeXt block; keeps
    # only its input) | blocks:POLICY, a jax.checkpoint_policies name of what a block keeps
    # as well: nothing_saveable (= blocks), dots_saveable (conv and matmul outputs: only norms
    # and activations are recomputed), dots_with_no_batch_dims_saveable (Dense outputs, e.g.
    # ConvNeXt's MLP). Memory and step time: experiments/README.md, "Rematerialisation".
    c.remat = "none"

    c.num_epochs = 6
    c.batch_size = 256  # global, split over all devices
    # Gradient accumulation: each step's batch_size examples run as this many micro-batches of
    # batch_size / grad_accum_steps, one after the other (their activations only in memory),
    # and make one optimizer update: the step, schedule, EMA, plateau and checkpoints count
    # updates. BatchNorm normalises each micro-batch with its own statistics and updates its
    # running statistics once per micro-batch.
    c.grad_accum_steps = 1
    c.optimizer = "sgd"  # sgd | adam | adamw | lamb | lion
    c.learning_rate = 0.2  # peak learning rate
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 5e-4  # on conv/dense kernels only
    c.grad_clip_norm = 0.0  # 0: off
    # Non-finite loss or gradients stop the run (the last good checkpoint stays the latest).
    # N > 0: skip such updates instead (optax.apply_if_finite; BatchNorm statistics and EMA skip
    # them too), counted in metrics.jsonl's skipped_updates, and stop at the N-th in a row.
    c.skip_nonfinite = 0
    c.schedule = "onecycle"  # constant | warmup_cosine | onecycle | piecewise
    c.warmup_epochs = 1.0
    c.final_lr_factor = 0.0  # warmup_cosine: final lr = learning_rate * this
    c.lr_decay_at = (0.5, 0.75)  # piecewise: fractions of training where lr *= lr_decay_factor
    c.lr_decay_factor = 0.1
    c.label_smoothing = 0.1
    # On-device augmentation, applied in order to normalised batches, e.g.
    # "crop(pad=2),flip,mixup(alpha=0.2)"; see cnnjax/data/augment.py for every op.
    c.augment = ""
    c.ema_decay = 0.0  # > 0: keep an EMA of the weights and evaluate with it (e.g. 0.999)
    # Evaluate on the mean logits of each image and its mirror image: only for data whose mirror
    # images look like the training images (CIFAR; not Fashion-MNIST, whose sneakers and boots
    # all face one way).
    c.flip_tta = False
    c.seed = 0
    # Identical results run to run on a GPU: python -m cnnjax.train adds XLA's
    # --xla_gpu_deterministic_ops=true before JAX starts (slower; docs/gpu.md). Nothing changes on
    # CPU, whose runs are bit-identical already.
    c.deterministic = False

    # ReduceLROnPlateau on the validation loss, checked once per epoch (patience 0: off).
    c.plateau = ConfigDict()
    c.plateau.patience = 0  # epochs without improvement before the lr is multiplied by factor
    c.plateau.factor = 0.5
    c.plateau.cooldown = 0  # epochs to wait after a reduction
    c.plateau.min_scale = 0.01  # the lr never drops below this fraction of the schedule's

    # EarlyStopping on checkpointing.best_metric (patience 0: off); the best checkpoint becomes
    # the final state.
    c.early_stopping_patience = 0  # epochs without improvement before stopping
    c.early_stopping_min_delta = 0.0  # smaller changes of the metric are no improvement

    # Transfer learning: start from another run's best checkpoint (matching paths; a new head
    # when num_classes differs), freeze a part, fine-tune another at a smaller learning rate.
    # Another run's workdir, or torchvision weights: "torchvision:NAME[:TAG|FILE|URL]" (model.name
    # must be NAME; the run then takes the weights' preprocessing: RGB, ImageNet mean/std, images
    # resized on the device to data.image_size, default the weights' crop size).
    c.init_from = config_dict.placeholder(str)
    c.freeze = ""  # regex of frozen parameter paths, or "backbone" (everything but the head)
    c.finetune = ""  # regex of paths trained at learning_rate * finetune_lr_factor
    c.finetune_lr_factor = 0.1

    c.log_every_steps = 50  # metrics are fetched from the device only this often
    # Resident data: train steps per dispatch from Python (a loop on the device, bit-identical
    # to one step per dispatch; signals are answered after the dispatch). 0: auto, 1 on CPU and
    # log_every_steps on GPU/TPU, where a small net's step is shorter than a dispatch.
    c.steps_per_dispatch = 0
    # "START:COUNT": a jax.profiler trace of global steps START .. START + COUNT - 1 in
    # WORKDIR/profile (TensorBoard's profile plugin, Perfetto); "": off.
    c.profile = ""
    # Evaluate the test split after every epoch, not only the last (time-to-accuracy runs).
    c.test_every_epoch = False

    c.data = ConfigDict()
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: ~/tensorflow_datasets)
    c.data.local_dir = config_dict.placeholder(str)  # original files, used when offline
    c.data.download = True  # False: never try to download (fail at once if not prepared)
    c.data.validation_fraction = 0.1  # carved from train when the dataset has no validation split
    c.data.in_memory = "auto"  # auto | yes | no: keep the whole dataset on the device
    c.data.in_memory_max_bytes = 2 * 1024**3  # auto: datasets up to this size stay on device
    # Streaming: resize to this (px) in tf.data; None: as is. From torchvision weights: the side
    # the model sees (resized on the device), default the weights' crop size.
    c.data.image_size = config_dict.placeholder(int)
    c.data.eval_batch_size = 1000
    c.data.limit_examples = 0  # keep only the first N examples of each split (0: all)

    c.checkpointing = ConfigDict()
    c.checkpointing.every_epochs = 1
    c.checkpointing.max_to_keep = 2  # the latest N, plus the best by best_metric
    c.checkpointing.best_metric = "eval_accuracy"  # any metrics.jsonl key of an epoch line
    c.checkpointing.best_mode = "max"  # max | min
    return c
