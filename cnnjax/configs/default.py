"""Default preset: Fashion-MNIST with the Keras tutorial CNN, on a 2-core CPU in minutes.

Run:
    python -m cnnjax.train                       # into checkpoints/default
    python -m cnnjax.train --config=default --workdir=/tmp/fmnist --config.num_epochs=3

Reaches ~92-93% test accuracy (docs/results.md has the measured figure and time).

``KEYS`` declares every training config key once: its default, what it accepts (the rule
``cnnjax.configs.validation.check`` applies, or ``ByName``: checked against a registry by the
trainer) and its meaning. A new key is one line here; ``docs/config.md`` is generated from it
(``python -m cnnjax.configs > docs/config.md``).
"""

import re

from ml_collections import ConfigDict

from cnnjax import rules as r
from cnnjax.configs.keys import ByName, Key, Unset, build
from cnnjax.models.common import REMAT_CHOICES
from cnnjax.run.metrics import EPOCH_METRICS

DTYPES = ("float32", "bfloat16", "float16")

_POSITIVE_INT = r.number(1, integer=True)
_COUNT = r.number(0, integer=True)
_NON_NEGATIVE = r.number(0, finite=True)
_FRACTION_BELOW_1 = r.number(0, 1, hi_open=True, finite=True)  # [0, 1)
_PATH = r.either(r.NONE, r.TEXT)
_PROFILE = r.Rule(
    "START:COUNT (the first global step to trace, >= 1, and how many, e.g. 10:5) or empty",
    lambda v: isinstance(v, str) and re.fullmatch(r"([1-9]\d*:[1-9]\d*)?", v) is not None,
)

# Each key: Key(path, default, rule, doc). A table, so not reformatted: path, default and rule
# stay on the key's first line.
# fmt: off
KEYS = (
    Key("model", {"name": "simple_cnn"},
        ByName("a group: `name` from the model registry plus that model's attributes, checked "
               "against the model"),
        "The model: a registry name plus any of its attributes, each settable from the command "
        "line (--config.model.name=resnet18 --config.model.small_input=True; "
        "--config.model=NAME is short for --config.model.name=NAME)."),
    Key("dataset", "fashion_mnist", r.TEXT,
        "TFDS dataset name (cifar10, mnist, ...), or folder:PATH for a folder of images "
        "(PATH/<class>/*, optionally in train/ validation/ test/)."),
    Key("dtype", "float32", r.choice(*DTYPES),
        "Compute dtype; parameters, optimizer state and BatchNorm statistics stay float32."),
    Key("conv_backend", "auto", r.choice("auto", "xla", "onednn"),
        "CPU convolutions (cnnjax/nn/kernels): auto defers to $CNNJAX_CONV, else picks the one "
        "measured faster. config.json records what ran: xla or onednn."),
    Key("remat", "none", r.choice(*REMAT_CHOICES),
        "Rematerialisation: recompute activations in the backward pass instead of keeping them, "
        "trading step time for memory; parameters, checkpoints and gradients are unchanged. "
        "blocks: each repeated block of the model (residual, bottleneck, inverted residual, "
        "MBConv, dense layer, inception, ConvNeXt block) keeps only its input; blocks:POLICY "
        "names a jax.checkpoint_policies of what a block keeps as well: nothing_saveable "
        "(= blocks), dots_saveable (conv and matmul outputs: only norms and activations are "
        "recomputed), dots_with_no_batch_dims_saveable (Dense outputs, e.g. ConvNeXt's MLP). "
        "Refused for models without blocks. Memory and step time: experiments/README.md, "
        "\"Rematerialisation\"."),

    Key("num_epochs", 6, _POSITIVE_INT, "Training length, in epochs."),
    Key("batch_size", 256, _POSITIVE_INT,
        "Images per optimizer update, global: split over all devices."),
    Key("grad_accum_steps", 1, _POSITIVE_INT,
        "Gradient accumulation: each update's batch_size images run as this many micro-batches "
        "of batch_size / grad_accum_steps, one after the other (only their activations in "
        "memory). The step, schedule, EMA, plateau and checkpoints count updates. BatchNorm "
        "normalises each micro-batch with its own statistics and updates its running statistics "
        "once per micro-batch."),
    Key("optimizer", "sgd", ByName("an optimizer name, checked against its registry"),
        "sgd, adam, adamw, lamb or lion."),
    Key("learning_rate", 0.2, r.number(0, lo_open=True, finite=True),
        "Peak learning rate (per update)."),
    Key("momentum", 0.9, _FRACTION_BELOW_1, "sgd: momentum; 0: none."),
    Key("nesterov", True, r.BOOL, "Nesterov momentum (sgd)."),
    Key("weight_decay", 5e-4, _NON_NEGATIVE,
        "Weight decay, on conv and dense kernels only: L2 added to the gradient (sgd, adam, as "
        "PyTorch's weight_decay) or decoupled (adamw, lamb, lion)."),
    Key("grad_clip_norm", 0.0, _NON_NEGATIVE, "Global gradient-norm clipping threshold; 0: off."),
    Key("skip_nonfinite", 0, _COUNT,
        "0: non-finite loss or gradients stop the run (the last good checkpoint stays the "
        "latest). N > 0: skip such updates instead (optax.apply_if_finite; BatchNorm statistics "
        "and EMA skip them too), counted in metrics.jsonl's skipped_updates, and stop at the "
        "N-th in a row."),
    Key("schedule", "onecycle", ByName("a schedule name, checked against its registry"),
        "Learning-rate schedule: constant, warmup_cosine, onecycle or piecewise."),
    Key("warmup_epochs", 1.0, _NON_NEGATIVE,
        "Warmup length, in epochs (fractions allowed); at most num_epochs."),
    Key("final_lr_factor", 0.0, _NON_NEGATIVE,
        "warmup_cosine: the final learning rate is learning_rate times this."),
    Key("lr_decay_at", (0.5, 0.75), r.increasing(0, 1),
        "piecewise: fractions of training at which the learning rate is multiplied by "
        "lr_decay_factor."),
    Key("lr_decay_factor", 0.1, r.number(0, 1, lo_open=True, finite=True),
        "piecewise: the factor applied at each lr_decay_at."),
    Key("label_smoothing", 0.1, _FRACTION_BELOW_1,
        "Label smoothing of the training loss's targets (0: hard labels)."),
    Key("augment", "", ByName("comma-separated augmentation ops, each checked against its "
                              "registry and its parameters' rules"),
        "On-device augmentation, applied in order to normalised batches, e.g. "
        "\"crop(pad=2),flip,mixup(alpha=0.2)\"; see cnnjax/data/augment.py for every op. "
        "Empty: none."),
    Key("ema_decay", 0.0, _FRACTION_BELOW_1,
        "> 0: keep an exponential moving average of the weights (decay per update, e.g. 0.999) "
        "and evaluate with it; 0: off."),
    Key("flip_tta", False, r.BOOL,
        "Evaluate on the mean logits of each image and its mirror image: only for data whose "
        "mirror images look like the training images (CIFAR; not Fashion-MNIST, whose sneakers "
        "and boots all face one way)."),
    Key("seed", 0, r.number(0, 2**32 - 1, integer=True),
        "Seed of the initialisation, data order, augmentation and dropout."),
    Key("deterministic", False, r.BOOL,
        "Identical results run to run on a GPU: python -m cnnjax.train adds XLA's "
        "--xla_gpu_deterministic_ops=true before JAX starts (slower; docs/gpu.md). Nothing "
        "changes on CPU, whose runs are bit-identical already."),

    # ReduceLROnPlateau
    Key("plateau.patience", 0, _COUNT,
        "ReduceLROnPlateau on the validation loss, checked once per epoch: epochs without "
        "improvement before the learning rate is multiplied by plateau.factor; 0: off."),
    Key("plateau.factor", 0.5, r.number(0, 1, lo_open=True, hi_open=True, finite=True),
        "ReduceLROnPlateau: the factor of each reduction."),
    Key("plateau.cooldown", 0, _COUNT, "ReduceLROnPlateau: epochs to wait after a reduction."),
    Key("plateau.min_scale", 0.01, r.number(0, 1, lo_open=True, finite=True),
        "ReduceLROnPlateau: the learning rate never drops below this fraction of the "
        "schedule's."),

    # EarlyStopping
    Key("early_stopping_patience", 0, _COUNT,
        "EarlyStopping on checkpointing.best_metric: epochs without improvement before "
        "stopping, the best checkpoint becoming the final state; 0: off."),
    Key("early_stopping_min_delta", 0.0, _NON_NEGATIVE,
        "EarlyStopping: smaller changes of the metric (in its units) are no improvement."),

    # Transfer learning
    Key("init_from", Unset(str), _PATH,
        "Transfer learning: start from another run's best checkpoint (matching paths; a new head "
        "when num_classes differs): its workdir, or torchvision weights, "
        "\"torchvision:NAME[:TAG|FILE|URL]\" (model.name must be NAME; the run then takes the "
        "weights' preprocessing: RGB, ImageNet mean and std, images resized on the device to "
        "data.image_size, default the weights' crop size). None: from scratch."),
    Key("freeze", "", r.REGEX,
        "Regex of frozen parameter paths (zero updates, BatchNorm statistics kept), or "
        "\"backbone\" (everything but the head); empty: none."),
    Key("finetune", "", r.REGEX,
        "Regex of parameter paths trained at learning_rate * finetune_lr_factor; empty: none."),
    Key("finetune_lr_factor", 0.1, _NON_NEGATIVE, "The learning-rate factor of finetune."),

    Key("log_every_steps", 50, _POSITIVE_INT,
        "Steps between fetches of the training metrics from the device."),
    Key("steps_per_dispatch", 0, _COUNT,
        "Resident data: train steps per dispatch from Python (a loop on the device, "
        "bit-identical to one step per dispatch; signals are answered after the dispatch). "
        "0: auto, 1 on CPU and log_every_steps on GPU/TPU, where a small net's step is shorter "
        "than a dispatch."),
    Key("profile", "", _PROFILE,
        "\"START:COUNT\": a jax.profiler trace of global steps START .. START + COUNT - 1 in "
        "WORKDIR/profile (TensorBoard's profile plugin, Perfetto); empty: off."),
    Key("test_every_epoch", False, r.BOOL,
        "Evaluate the test split after every epoch, not only the last (time-to-accuracy runs)."),

    Key("data.data_dir", Unset(str), _PATH, "TFDS data_dir; None: ~/tensorflow_datasets."),
    Key("data.local_dir", Unset(str), _PATH,
        "Directory of the dataset's original files, used when offline; None: none."),
    Key("data.download", True, r.BOOL,
        "False: never try to download (fail at once if the data is not prepared)."),
    Key("data.validation_fraction", 0.1, _FRACTION_BELOW_1,
        "Fraction of train carved out for validation when the dataset has no validation split."),
    Key("data.in_memory", "auto", r.choice("auto", "yes", "no"),
        "Keep the whole dataset on the device (yes), stream it (no), or decide by "
        "data.in_memory_max_bytes (auto)."),
    Key("data.in_memory_max_bytes", 2 * 1024**3, _COUNT,
        "auto: datasets up to this size, in bytes, stay on the device."),
    Key("data.image_size", Unset(int), r.either(r.NONE, _POSITIVE_INT),
        "Side, in px, the images of a folder (or of a TFDS dataset whose images differ in size) "
        "are resized to when read; None: as they are (they must then share one size). From "
        "torchvision weights: the side the model sees (resized on the device), default the "
        "weights' crop size."),
    Key("data.channels", 0, r.Rule("0, 1 or 3", lambda v: v in (0, 1, 3) and type(v) is int),
        "A folder's images as grey (1) or RGB (3); 0: as most of them are."),
    Key("data.test_fraction", 0.1, _FRACTION_BELOW_1,
        "Fraction of a folder's train images carved out for test when it has no test/ folder."),
    Key("data.workers", 0, _COUNT,
        "Streaming: processes that read and decode batches (Grain); 0: threads of the trainer."),
    Key("data.eval_batch_size", 1000, _POSITIVE_INT, "Images per evaluation batch, global."),
    Key("data.limit_examples", 0, _COUNT,
        "Keep only the first N examples of each split; 0: all."),

    Key("checkpointing.every_epochs", 1, _POSITIVE_INT, "Epochs between checkpoints."),
    Key("checkpointing.max_to_keep", 2, _POSITIVE_INT,
        "Checkpoints kept: the latest N, plus the best by checkpointing.best_metric."),
    Key("checkpointing.best_metric", "eval_accuracy", r.choice(*EPOCH_METRICS),
        "The metrics.jsonl key of an epoch line that ranks checkpoints (and early stopping)."),
    Key("checkpointing.best_mode", "max", r.choice("max", "min"),
        "Whether a larger (max) or smaller (min) best_metric is better."),
)
# fmt: on


def get_config() -> ConfigDict:
    return build(KEYS)
