"""ImageNet-LT (Liu et al. 2019) with ResNet-50, Dirichlet 0.1 (paper Sec. 4.1).

  python -m fedllava.main --config=configs/imagenet_lt.py --config.data.manual_dir=/data/imagenet

TFDS ``imagenet_lt`` needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the manual
directory (default ~/tensorflow_datasets/downloads/manual); a missing directory is a clear
error. ImageNet-LT is long-tailed already (1280..5 images a class): imbalance_factor 1 keeps it
as it is. Client data is gathered on the host each round (placement=host): it does not fit
replicated on a device. Stage 3 holds out ``align.per_class`` images of each of the 1000
classes and uses CLIP ViT-L/14-336 (``align.teacher``) for the zero-shot q of Eq. 6.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, **{"algo": "fedavg", "rounds": 200, "size": 224, "k": 10})
  c = common.base_config()
  c.name = f"imagenet_lt_{a.algo}"
  c.data.name = "imagenet_lt"
  c.data.image_size = a.size
  c.data.imbalance_factor = 1.0
  c.data.dirichlet_alpha = 0.1
  c.data.crop_padding = 0  # ImageNet images: no CIFAR-style pad-and-crop
  c.data.placement = "host"
  c.model.name = "resnet50"
  c.fl.algorithm = a.algo
  c.fl.rounds = a.rounds
  c.align.per_class = a.k
  c.align.templates = "imagenet"  # CLIP's 80 ImageNet prompts
  c.eval.batch_size = 256
  return c
