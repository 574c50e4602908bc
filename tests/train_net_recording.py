"""``python tests/train_net_recording.py ARGS``: ``python train_net.py ARGS``, and each worker
also saves what the tests compare to ``OUTPUT_DIR/worker<rank>.pth``: its model's state and the
per-iteration total loss it logged (the mean over workers, on the main one).

The recording trainer is put in place at import, so that the workers that Detectron2's or
dab_detr's ``launch`` spawns (they import this file as their ``__main__``) record too.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.utils import comm  # noqa: E402

import train_net  # noqa: E402


class RecordingTrainer(train_net.Trainer):
    def train(self):
        results = super().train()
        model = getattr(self.model, "module", self.model)
        losses = {it: v for v, it in self.storage.history("total_loss").values()} \
            if "total_loss" in self.storage.histories() else {}
        torch.save({"state": model.state_dict(), "losses": losses, "threads":
                    torch.get_num_threads()},
                   os.path.join(self.cfg.OUTPUT_DIR, f"worker{comm.get_rank()}.pth"))
        return results


train_net.Trainer = RecordingTrainer

if __name__ == "__main__":
    train_net.cli(sys.argv[1:])
