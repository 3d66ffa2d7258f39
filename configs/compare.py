"""PTI, HFGI and DHR side by side from one embedding (the paper's Table 1).

    python run.py --config=configs/compare.py --config.data.input=DIR \
        --workdir=OUT [--config.model.hfgi=HFGI_DIR]
    python run.py --config=configs/compare.py:demo --workdir=OUT   # no weights

Without an argument: configs/dhr.py's settings (e4e embedding, DHR's
refinement) plus config.compare. With `:demo`: configs/demo.py's synthetic
ground-truth case (stand-in generator, optimisation embedding, pasted
patch), so the comparison runs offline; the table then also has PSNR inside
and outside the known patch. See dhr_jax/compare.py for the outputs.

config.compare.methods: any of embedding (the codes alone: e4e-only),
pti, hfgi (only when config.model.hfgi names a converted HFGI checkpoint;
the demo's is a stand-in, 'stand-in'),
dhr, diffcam (only with config.edit.method='diffcam', which adds it: the
row "Diff-CAM (pSp)" on the same directions, from the pSp of
config.compare.encoders or the run's own pSp embedding).
config.compare.pti: the refine settings PTI replaces (configs/pti.py's; in
the demo its step count is the demo's refinement's, so that both methods
get the same budget). config.compare.pti_pivot: 'w' (PTI's own W pivot, a
fresh optimisation from latent_avg with config.compare.pti_embedding,
configs/pti.py's embedding: GANInverter's pti_pivot.yaml; titled "PTI (W
pivot)") or 'embedding' (the run's shared embedding, e.g. the e4e codes:
"PTI (e4e pivot)"). In the demo the W pivot gets the coarse inversion's 40
steps instead of 450, to stay quick.

config.compare.encoders: "name=DIR,..." (e.g. e4e=ckpt/e4e_ffhq,
psp=ckpt/psp_ffhq,lsap=ckpt/lsap_ffhq,restyle=ckpt/restyle_e4e_ffhq): the
paper's Table 1 layout, "<name> only" and "DHR (<name>)" per encoder,
"ReStyle" for a ReStyle encoder (iterated), "HFGI (e4e)" on the e4e
entry's codes; DSS runs once per image and each encoder once. A folder
that does not exist leaves its rows out with a warning. The demo's
encoders and HFGI are seeded random stand-ins (e4e, pSp, LSAP (an e4e
network), ReStyle: `synthetic.stand_in_encoder`; HFGI:
`synthetic.stand_in_hfgi`) of its generator.
"""
import os

import ml_collections

from dhr_jax.config_files import load_config


def _config(name):
  # The config file beside this one, from any working directory.
  return load_config(os.path.join(os.path.dirname(__file__), name))


_PTI_KEYS = ("mode", "feature_steps", "weight_steps", "weight_lr",
             "l2_lambda", "lpips_lambda", "mse_norm")


def get_config(arg="dhr"):
  if arg not in ("dhr", "demo"):
    raise ValueError(f"configs/compare.py:{arg}: use :demo or nothing")
  config = _config("demo.py" if arg == "demo" else "dhr.py")
  pti_config = _config("pti.py")
  pti = {k: pti_config.refine[k] for k in _PTI_KEYS}
  pivot = pti_config.embedding
  if arg == "demo":
    pti.update(feature_steps=config.refine.feature_steps,
               weight_steps=config.refine.feature_steps)
    # The demo's budget: as many pivot steps as its coarse inversion.
    pivot.steps = config.dss.coarse_steps
  # The demo's HFGI is a stand-in for its generator (no weights), as its
  # encoders are.
  config.model.hfgi = "stand-in" if arg == "demo" else ""
  config.compare = ml_collections.ConfigDict(dict(
      methods="embedding,pti,hfgi,dhr",
      # The paper's Table 1 layout: "name=DIR,..." of converted encoder
      # bundles (converters.e4e / converters.encoder); the demo's are
      # stand-ins built in memory. "" = the run's own embedding only.
      encoders=("e4e=stand-in,psp=stand-in,lsap=stand-in,restyle=stand-in"
                if arg == "demo" else ""),
      pti=ml_collections.ConfigDict(pti),
      pti_pivot="w",
      pti_embedding=pivot))
  return config
