"Networks with known or fixed output for the tests: geometry and plumbing are checked without training anything"
import torch

from liver_seg.model import build_model, default_config, save_model_folder

HU_INPUT = {'kind': 'hu_windows', 'windows': [[150, 30], [200, 60]], 'freqhist': True, 'context': 0}


class BrightIsLiver(torch.nn.Conv2d):
    "Fixed 1x1 conv: liver where the first (liver-window) channel is bright (HU > 30 with the default windows), so its output is known"
    def __init__(self):
        super().__init__(3, 3, 1)
        with torch.no_grad():
            self.weight.zero_(); self.bias.zero_()
            self.weight[1, 0] = 8.; self.bias[2] = -100.


def untrained_model_folder(folder, arch='resnet34', precision='bf16', seed=0, size=64, **config):
    "A model folder of an untrained U-Net: its labels are arbitrary but fixed, which is all geometry checks need"
    cfg = default_config(arch=arch, size=size, precision=precision, input=HU_INPUT, **config)
    torch.manual_seed(seed)
    return save_model_folder(build_model(cfg), cfg, folder)
