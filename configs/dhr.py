"""DHR with the paper's settings (Cao et al., arXiv 2301.12141).

    python run.py --config=configs/dhr.py --config.data.input=DIR \
        --workdir=OUT [--config.refine.feature_steps=200 ...]

Needs the converted e4e bundle (encoder + the StyleGAN2 it was trained with):

    python -m converters.e4e --src e4e_ffhq_encode.pt --dst ckpt/e4e_ffhq

and the FaRL face parser (facer's celebm/448) for DSS's class-wise
thresholds and parsing mask:

    python -m converters.farl --src face_parsing.farl.celebm.main_ema_181500_jit.pt \
        --dst ckpt/farl

(--config.model.parser=none runs without it: one threshold for every
superpixel, no parsing mask; not the paper's DSS.)

and, optionally, the paper's identity network for its ID metric
(--config.model.id_network=ckpt/curricularface adds id_curricularface):

    python -m converters.curricularface --src CurricularFace_Backbone.pth \
        --dst ckpt/curricularface
"""
import ml_collections

# The parser's classes with their own DSS threshold (CelebAMask-HQ's inner
# face); every other class but `face` has 0.6.
_INNER_FACE = ("rr", "lr", "rb", "lb", "re", "le", "nose", "imouth", "llip",
               "ulip")


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Images per batch (rounded up to a multiple of the device count): the
  # embedding and DSS run on the batch at once; the refinement does too on
  # an accelerator, and one image after another on CPU.
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
      # The encoder bundle DIR of embedding.method (DIR/e4e + DIR/generator
      # from converters.e4e; DIR/psp or DIR/restyle from converters.encoder).
      checkpoint="ckpt/e4e_ffhq",
      # Another generator checkpoint (converters.stylegan2); "" = the bundle's.
      generator="",
      # FaRL parser (converters.farl). 'none' (or '') = DSS with one
      # threshold and no parsing mask, not the paper's (a warning says so).
      # The parser's five landmarks come from dlib's detector with the
      # `faces` extra (RetinaFace's weights, the official code's, are not to
      # be had offline), else from the FFHQ template.
      parser="ckpt/farl",
      # CurricularFace IR-101 (converters.curricularface): adds the paper's
      # ID metric, column id_curricularface (needs the `faces` extra: dlib
      # finds the landmarks MTCNN finds in the official script); "" = off.
      id_network="",
      # edit.method='diffcam' only (README "Editing via differential
      # activations"): model.checkpoint is then the converted pSp bundle
      # (converters.encoder), these the converted DiffCam
      # (converters.diffcam) and deghosting network (converters.deghosting).
      diffcam="",
      deghosting="",
  ))

  config.embedding = ml_collections.ConfigDict(dict(
      # 'e4e', 'psp' or 'restyle' (the converted encoder bundle of
      # model.checkpoint, converters.encoder) or 'optim' (projector in W /
      # W+).
      method="e4e",
      # 'restyle' only: its iterations (the official inference's 5); the
      # codes are the last iteration's.
      restyle_iterations=5,
      # 'optim' only:
      # Start: 'latent_avg' (the official optimisation embedding: a fresh
      # run from the generator's latent_avg) or 'coarse' (continue DSS's
      # coarse W inversion: fewer steps, not the official embedding).
      init="latent_avg",
      steps=500,
      space="w+",
      lr=0.1,
      mse_lambda=0.0,
      n_mean_latent=10000,
  ))

  # Domain-specific segmentation, the official settings (the library's
  # defaults too: dhr_jax.segmentation.default_config; it checks these
  # fields, class names and choices when DSS runs).
  config.dss = ml_collections.ConfigDict(dict(
      coarse_steps=40,
      n_segments=200,
      compactness=30.0,
      sigma=1.0,
      # θ per parsing class: a superpixel is in-domain when its score < θ.
      thresholds={name: 0.7 if name == "face" else
                  0.8 if name in _INNER_FACE else 0.6
                  for name in ("background", "neck", "face", "cloth", "rr",
                               "lr", "rb", "lb", "re", "le", "nose",
                               "imouth", "llip", "ulip", "hair", "glass",
                               "hat", "earr", "neckl")},
      # Without any parsing, every superpixel is compared with this value.
      single_threshold=0.7,
      # Out-of-domain where these classes' summed probability reaches
      # parsing_threshold, whatever the superpixel says.
      out_of_domain_classes=("background", "cloth", "hat", "earr", "neckl"),
      parsing_threshold=0.5,
      # Otsu over the superpixel scores instead of the fixed thresholds.
      adaptive=False,
      # "bgr" as the official code (SLIC on OpenCV's array), "rgb" the true
      # colours.
      slic_channels="bgr",
      # A superpixel with no pixel at an LPIPS map's resolution: "nan"
      # (official: out-of-domain) or "own_pixels" (read at its own pixels).
      vanished_superpixels="nan",
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
      mse_norm="pixel",          # MSE over masked pixels ('element': PTI)
  ))

  # Edits rendered for every image (and by --mode=edit on a finished run).
  config.edit = ml_collections.ConfigDict(dict(
      # 'dhr' (invert, refine, edit the refined generator) or 'diffcam'
      # (edit pSp's codes and blend the edit into the photo where DiffCam's
      # differential activations put it, then deghost; no DSS, no
      # refinement). diffcam's directions are "name=path" with name one of
      # the seven published (Smiling, ...) or "name:class=path".
      method="dhr",
      # diffcam: the edit's strength along the unit direction (published 20).
      alpha=20.0,
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
