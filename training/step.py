"""One training step (forward, loss, backward, optimizer step), run eagerly or from a CUDA graph.

Why a CUDA graph: DenseNet-BC on 32x32 images launches thousands of small kernels per step, and
on a fast GPU launching them costs more than running them. A CUDA graph records the kernels of a
whole step once and replays them with one launch. Capture needs fixed shapes and addresses, so
batches are copied into static input tensors; a batch of another shape (the last, smaller one of
an epoch) runs eagerly. Capture also needs a step without host synchronisation: the fp16
gradient scaler checks for infinities on the host, so graphs take --amp off or bf16; the
learning rate is a tensor that the scheduler updates in place, so milestones need no re-capture.
Following PyTorch's recipe, a few warm-up steps run eagerly on a side stream first (they are
real training steps), so that lazily created state (cuDNN plans, momentum buffers) exists
before capture.
"""

import torch
import torch.nn.functional as F

from .devices import autocast

WARMUP_STEPS = 3


class EagerStep:
    """The plain training step; returns the detached loss and logits."""

    def __init__(self, model, optimizer, scaler, amp, device):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.amp, self.device = amp, device

    def __call__(self, inputs, targets):
        with autocast(self.amp, self.device):
            logits = self.model(inputs)
            loss = F.cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()


class GraphedStep:
    """EagerStep captured in a CUDA graph after WARMUP_STEPS steps, then replayed."""

    def __init__(self, eager_step):
        self.eager = eager_step
        self.steps = 0
        self.graph = None
        self.static_inputs = self.static_targets = self.outputs = None

    def __call__(self, inputs, targets):
        if self.graph is not None and inputs.shape == self.static_inputs.shape:
            self.static_inputs.copy_(inputs)
            self.static_targets.copy_(targets)
            self.graph.replay()
            return self.outputs
        if self.graph is not None or self.steps >= WARMUP_STEPS:
            if self.graph is None:
                return self._capture_and_replay(inputs, targets)
            return self.eager(inputs, targets)  # another shape: the epoch's last batch
        self.steps += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.eager(inputs, targets)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture_and_replay(self, inputs, targets):
        self.static_inputs, self.static_targets = inputs.clone(), targets.clone()
        self.graph = torch.cuda.CUDAGraph()
        self.eager.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.outputs = self.eager(self.static_inputs, self.static_targets)
        self.graph.replay()  # capture only records: this runs the step on this batch
        return self.outputs


def make_step(model, optimizer, scaler, config, device):
    """The step the configuration asks for: eager (maybe a compiled model) or a CUDA graph."""
    step = EagerStep(model, optimizer, scaler, config["amp"], device)
    return GraphedStep(step) if config["cuda_graph"] else step


def graphable_lr(config, device):
    """The learning rate as SGD takes it: a device tensor under CUDA graphs (updated in place
    by the scheduler, so a captured step sees every change), else a number."""
    if config["cuda_graph"]:
        return torch.tensor(config["lr"], dtype=torch.float32, device=device)
    return config["lr"]
