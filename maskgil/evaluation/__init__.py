"""Evaluation at scale (generation as a Ray Data job, FID / precision / recall / IS / class accuracy)
and the helpers of the Ray Tune sweeps (sweep files, trial functions, tables and plots)."""
from maskgil.evaluation.adm_npz import AdmNpzWriter
from maskgil.evaluation.generation import ModelPaths, SampleAndDecode, SamplerSpec, ScoreImages, chunk_seed
from maskgil.evaluation.reference import load_reference
from maskgil.evaluation.run import EvalConfig, evaluate, format_result

__all__ = ["AdmNpzWriter", "EvalConfig", "ModelPaths", "SampleAndDecode", "SamplerSpec", "ScoreImages", "chunk_seed",
           "evaluate", "format_result", "load_reference"]
