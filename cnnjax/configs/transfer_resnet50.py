"""CIFAR-10 from torchvision's ImageNet ResNet-50, in two phases: the tutorials' transfer
recipe, for a GPU VM.

Phase 1 (``head``, the default): torchvision's ``IMAGENET1K_V2`` weights (downloaded once into
torch hub's cache), the backbone frozen (zero updates, BatchNorm statistics kept), a new
10-class head trained. Phase 2 (``finetune``): starts from phase 1's best checkpoint and trains
the last stage (``stage4``) at a tenth of the head's learning rate, the rest still frozen.

Run (phase 2 needs its own ``--workdir``; its ``init_from`` defaults to phase 1's):
    python -m cnnjax.train --config=transfer_resnet50 --workdir=checkpoints/transfer_resnet50
    python -m cnnjax.train --config=transfer_resnet50:finetune \\
        --workdir=checkpoints/transfer_resnet50_finetune \\
        --config.init_from=checkpoints/transfer_resnet50

Both phases take the weights' preprocessing (recorded in ``dataset.json``; phase 2 inherits
phase 1's): CIFAR's 32 px images stay on the device as uint8 and each batch is resized to
224 px (bilinear) and normalised with ImageNet's mean and std inside the jitted step. Offline,
put ``resnet50-11ad3fa6.pth`` into ``$TORCH_HOME/hub/checkpoints/`` or pass
``--config.init_from=torchvision:resnet50:/path/to/resnet50-11ad3fa6.pth``.

Expected, from published linear-probe and fine-tuning results of ImageNet ResNet-50s on
CIFAR-10 at 224 px (not measured here: this project had no GPU): phase 1 about 88-91% test
accuracy, phase 2 about 95-97%. At 224 px a ResNet-50 step costs 4.1 GMACs per image forward;
budget roughly 10 minutes per epoch on one modern GPU.
"""

from ml_collections import ConfigDict

from cnnjax.configs import default

PHASES = ("head", "finetune")


def get_config(phase: str = "head") -> ConfigDict:
    if phase not in PHASES:
        raise ValueError(f"transfer_resnet50 phase must be one of {PHASES}, got {phase!r}")
    c = default.get_config()
    c.model = ConfigDict({"name": "resnet50"})  # torchvision's layout: its weights load as is
    c.dataset = "cifar10"
    c.batch_size = 128
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4  # trained kernels only; frozen ones get no update at all
    c.schedule = "warmup_cosine"
    c.warmup_epochs = 0.5
    c.label_smoothing = 0.1
    # Normalised 224 px batches: a 28 px pad-and-crop is CIFAR's usual 4 px at 32 px.
    c.augment = "crop(pad=28),flip"
    c.flip_tta = True  # CIFAR's mirror images are in distribution
    c.data.validation_fraction = 0.1
    c.data.eval_batch_size = 500
    c.freeze = "backbone"  # everything but the head
    if phase == "head":
        c.init_from = "torchvision:resnet50"  # IMAGENET1K_V2; the preprocessing comes with it
        c.num_epochs = 5
        c.learning_rate = 0.1  # the head's
    else:
        c.init_from = "checkpoints/transfer_resnet50"  # phase 1's workdir
        c.num_epochs = 10
        c.learning_rate = 0.01  # the head's; stage4 at finetune_lr_factor of it
        c.finetune = "^stage4"
        c.finetune_lr_factor = 0.1
    return c
