"""tensorflow-datasets builders for the public datasets behind registration (manual download),
and a converter from any prepared tfds video dataset to our shards.

    EchonetDynamic   echonet_dynamic   FileList.csv + Videos/*.avi, EF / ESV / EDV, TRAIN/VAL/TEST
    PolypDiag        polyp_diag        videos/*.mp4 + splits/{train,val}.txt, normal / abnormal
    to_shards(builder, out_dir)        a prepared builder -> ArrayRecord shards + index.json

Importing this package registers the builders with tfds (``tfds.builder("echonet_dynamic")``).
They need no TensorFlow: frames are zlib-compressed ``Tensor`` features in ArrayRecord files.
"""

from vidssm_jax.data.tfds.convert import to_shards
from vidssm_jax.data.tfds.echonet_dynamic import EchonetDynamic
from vidssm_jax.data.tfds.polypdiag import PolypDiag

__all__ = ["EchonetDynamic", "PolypDiag", "to_shards"]
