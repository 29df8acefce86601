"Settings for the whole test session"
import torch

# One thread count for every in-process test: set per module, the last module pytest imported would win for all
torch.set_num_threads(2)
