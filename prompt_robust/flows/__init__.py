"""What the two generative add-ons share: the refiner (a flow over prompts) and the counterfactual regularizer (a
flow over image features) both train a velocity field by flow matching on the straight noise-to-data path,
embed its time the same way, and integrate it with the same fixed-grid ODE sampler. The networks themselves stay
with their add-ons (samplers are separate from the networks they integrate)."""

from .matching import flow_matching_loss
from .sampler import SOLVER_ORDERS, ODESampler, SamplerOutput
from .time import TimeEmbedding, time_embedding

__all__ = ["SOLVER_ORDERS", "ODESampler", "SamplerOutput", "TimeEmbedding", "flow_matching_loss", "time_embedding"]
