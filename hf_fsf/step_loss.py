"""Where an optimizer step's loss comes from: the loss FSCOptimizer's target `rate × loss` is taken of.

Sources, first available wins: the closure's or `step(loss=...)`'s loss; the losses recorded since the last step
(`observe`, or `LossCapture`, a forward hook that records `output.loss` of the model's training forwards; inside the
HF Trainer, `observe_backward`: the loss the Trainer back-propagates, whatever computed it). Without the Trainer's
backward, the last source has two complications:

- with `num_items_in_batch`, each micro-batch loss is a *share* of the step's mean (summed, not averaged), and a
  window of shares whose step never ran (fp16 overflow skips optimizer.step()) must not leak into the next step;
- under data parallelism every rank must use the same loss, so the losses are reduced over ranks, and whether the
  shares are summed or averaged over ranks depends on whether num_items_in_batch counted every rank's tokens.

The loss stays a device tensor: reading it to the host is left to the optimizer, which reads it together with
everything else it needs (one host sync per step).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hf_fsf.distributed import world_size


class StepLossTracker:
    """The loss of the coming optimizer step, from the sources recorded since the last one."""

    def __init__(self) -> None:
        self._pending: list[torch.Tensor] = []
        self._shares = False
        self._window: int | None = None
        self.from_backward = False  # True once the Trainer's backward feeds the tracker: forwards are ignored
        self._clear_items()

    def observe_backward(self, loss: torch.Tensor, window: int) -> None:
        """Record a loss the HF Trainer back-propagates, of the step counted `window` (its global_step).

        The Trainer back-propagates each micro-batch's part of the step's loss (a mean divided by the accumulation
        steps, or a share of num_items_in_batch; under data parallelism scaled so that the ranks' mean is the
        global one): the step's loss is their sum on a rank, the mean over ranks, what the Trainer logs. Parts of
        an earlier window belong to a step that never reached step() (fp16 overflow) and are dropped.
        """
        if window != self._window:
            self._pending.clear()
            self._window = window
        self.from_backward = True
        self.observe(loss, share=True)

    def observe(self, loss: torch.Tensor | float, share: bool = False) -> None:
        """Record the loss of a forward pass that feeds the next step (once per micro-batch).

        share=False: the step's loss is the mean of the recorded ones; share=True: their sum (each is a share of
        the step's mean, as when HF models get num_items_in_batch).
        """
        self._pending.append(
            loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(loss)
        )
        self._shares = self._shares or share

    def observe_share(self, loss: torch.Tensor, num_items: Any, labels: Any) -> None:
        """A micro-batch loss that is a share of the step's mean (HF Trainer: num_items_in_batch passed).

        The Trainer makes one count per step, passed to each of its micro-batches: shares of an earlier count
        belong to a step that never reached step() and are dropped. Under data parallelism the rank also counts
        its labelled tokens, which tells `_reduce_over_ranks` whether the count was summed over ranks
        (average_tokens_across_devices=True) or is this rank's own.
        """
        stale = self._items is not None and num_items is not self._items
        if isinstance(num_items, torch.Tensor) and stale:
            self._pending.clear()
            self._clear_items()
        self.observe(loss, share=True)
        self._items = num_items
        if world_size() > 1:  # single-process training pays nothing for the count
            if isinstance(labels, torch.Tensor):
                self._labels = self._labels + (labels != -100).sum()
            else:
                self._labels_known = False

    def take(self, loss: torch.Tensor | float | None = None) -> torch.Tensor | None:
        """This step's loss as a float64 0-dim tensor, identical on every rank; None when there is none.

        `loss` (the closure's or step(loss=)'s) wins over the recorded ones. Clears what was recorded.
        """
        shares = False
        if loss is not None:
            value = loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        elif self._pending:
            device = self._pending[0].device
            stacked = torch.stack([x.to(device, torch.float64) for x in self._pending])
            shares = self._shares
            value = stacked.sum() if shares else stacked.mean()
        else:
            value = None
        self._pending.clear()
        self._shares = False
        if value is None:
            self._clear_items()
            return None
        return self._reduce_over_ranks(value.to(torch.float64), shares)

    def _clear_items(self) -> None:
        self._items: torch.Tensor | int | None = None
        self._labels: torch.Tensor | int = 0
        self._labels_known = True

    def _reduce_over_ranks(self, value: torch.Tensor, shares: bool) -> torch.Tensor:
        """The loss every rank uses, so that all ranks take the same step.

        Plain losses: the mean over ranks. Shares (num_items_in_batch): the sum over ranks when num_items_in_batch
        counted every rank's tokens (the Trainer's default average_tokens_across_devices=True), else the mean
        (False: each rank's shares add up to its own mean). Which one is read off the count: a rank's own
        labelled tokens are never fewer than a count of its own, and fewer than a count over all ranks; without
        labels the Trainer's default is assumed. Each rank votes; the vote travels with the loss. The Trainer's
        backward parts (observe_backward) are already scaled by the Trainer: the mean.
        """
        items, labels, known = self._items, self._labels, self._labels_known
        self._clear_items()
        if world_size() == 1:
            return value
        dist = torch.distributed
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else value.device
        value = value.to(device)
        if self.from_backward:  # the Trainer's backward parts: summed per rank, averaged over ranks
            vote = torch.zeros((), device=device, dtype=torch.float64)
        elif shares and known and items is not None:
            own = torch.as_tensor(items, device=device).double() <= torch.as_tensor(labels, device=device)
            vote = (~own).double()
        else:
            vote = torch.tensor(1.0 if shares else 0.0, device=device, dtype=torch.float64)
        both = torch.stack([value, vote])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        total, votes = both[0], both[1]
        mean = total / dist.get_world_size()
        return torch.where(votes > 0, total, mean) if shares else mean


class LossCapture:
    """Forward hook on the model: records `output.loss` of training forwards in a StepLossTracker.

    Holds weak references, so that a hook copied along with the model (copy.deepcopy) stays inert.
    """

    def __init__(self, tracker: StepLossTracker, model: nn.Module) -> None:
        self.tracker = weakref.ref(tracker)
        self.model = weakref.ref(model)

    def __call__(self, module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        tracker = self.tracker()
        if (
            tracker is None
            or tracker.from_backward
            or module is not self.model()
            or not module.training
            or not torch.is_grad_enabled()
        ):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            num_items = kwargs.get("num_items_in_batch")
            if num_items is None:
                tracker.observe(loss)
            else:
                tracker.observe_share(loss, num_items, kwargs.get("labels"))
