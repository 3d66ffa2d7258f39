"""DHR with the paper's settings (Cao et al., arXiv 2301.12141).

    python run.py --config=configs/dhr.py --config.data.input=DIR \
        --workdir=OUT [--config.refine.feature_steps=200 ...]

Needs the converted e4e bundle (encoder + the StyleGAN2 it was trained with):

    python -m converters.e4e --src e4e_ffhq_encode.pt --dst ckpt/e4e_ffhq

and optionally the FaRL face parser for the class-wise thresholds:

    python -m converters.farl --src face_parsing.farl.celebm.main_ema_181500_jit.pt \
        --dst ckpt/farl
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Images per vmapped batch (rounded up to a multiple of the device count).
  config.batch_size = 4

  config.data = ml_collections.ConfigDict(dict(
      # A folder (its png/jpg/jpeg/webp, sorted) or one image file; aligned
      # faces at any size (centre-cropped to a square, resized to the
      # generator's resolution).
      input="",
      # Raw photos: find the faces (dlib, the `faces` extra), FFHQ-align
      # each at the generator's resolution, run DHR on every face and paste
      # the results back into the photo (OUT/<photo>/face<k>/pasted/,
      # OUT/<photo>/pasted_all.png).
      align=False,
      faces="largest",    # 'largest' or 'all' detected faces
      min_face_size=64,   # smallest face (detector box side) in photo pixels
  ))

  config.model = ml_collections.ConfigDict(dict(
      # The e4e converter's bundle DIR (DIR/e4e + DIR/generator).
      checkpoint="ckpt/e4e_ffhq",
      # Another generator checkpoint (converters.stylegan2); "" = the bundle's.
      generator="",
      # FaRL parser (converters.farl); "" = DSS with one threshold, no parsing.
      parser="",
  ))

  config.embedding = ml_collections.ConfigDict(dict(
      method="e4e",   # 'e4e' (the encoder) or 'optim' (projector in W / W+)
      # 'optim' only:
      steps=500,
      space="w+",
      lr=0.1,
      mse_lambda=0.0,
      n_mean_latent=10000,
  ))

  # Domain-specific segmentation (dhr_jax.segmentation.default_config).
  thresholds = {name: 0.6 for name in (
      "background", "neck", "face", "cloth", "rr", "lr", "rb", "lb", "re",
      "le", "nose", "imouth", "llip", "ulip", "hair", "glass", "hat", "earr",
      "neckl")}
  thresholds["face"] = 0.7
  thresholds.update({name: 0.8 for name in (
      "rr", "lr", "rb", "lb", "re", "le", "nose", "imouth", "llip", "ulip")})
  config.dss = ml_collections.ConfigDict(dict(
      coarse_steps=40,
      n_segments=200,
      compactness=30.0,
      sigma=1.0,
      thresholds=thresholds,     # θ per parsing class (with a parser)
      single_threshold=0.7,      # θ of every superpixel without a parser
      out_of_domain_classes=("background", "cloth", "hat", "earr", "neckl"),
      parsing_threshold=0.5,
      adaptive=False,            # Otsu over each image's superpixel scores
  ))

  config.refine = ml_collections.ConfigDict(dict(
      mode="hybrid",             # 'hybrid', 'weight' (PTI-like), 'feature'
      feature_idx=11,            # the 128² feature of a 1024² generator
      feature_steps=100,
      weight_steps=50,
      feature_lr=9e-2,
      weight_lr=1.5e-3,
      l2_lambda=1.0,
      lpips_lambda=1.0,
  ))

  # Edits rendered for every image (and by --mode=edit on a finished run).
  config.edit = ml_collections.ConfigDict(dict(
      # InterFaceGAN directions: "name=path.npy,name2=path.pt" ((D,) or (L, D)).
      directions="",
      strengths="-3,3",          # α of w + α·n, comma-separated
      layers="",                 # '' = all, 'first:last' (half-open), 'i,j'
      # GANSpace: components file (.npz / e4e's ffhq_pca.pt) and edits
      # "component,first,last,strength; ..." ('+' joins tuples into one edit).
      ganspace="",
      ganspace_edits="",
      ganspace_mode="add",       # 'add' (GANSpace σ steps) or 'set' (e4e)
      # >= 0: also a seeded random unit direction in W named 'random'.
      random_direction_seed=-1,
  ))

  config.save = ml_collections.ConfigDict(dict(
      # Also coarse.png, superpixels.png, parsing.png, error_map.png and
      # embedding.png per image.
      intermediate=False,
  ))
  return config
