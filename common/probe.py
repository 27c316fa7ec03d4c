"""The online linear probe of the pre-training scripts: a linear classifier trained, in every step, on the
detached trunk features of the training batch, with its own optimizer, and evaluated on the validation split
every cfg.probe_every epochs (eval/probe_top1, eval/probe_top5). It is solo-learn's online classifier, whose
numbers the CIFAR-10 configs target.

The features are standardised by a batch norm without affine parameters (statistics of the global batch), which
makes one probe lr right for any trunk (on raw ResNet features, SGD at lr 0.1 diverged in a CPU check) and which,
with its running statistics, folds into the linear layer at evaluation: the probe is a linear classifier of the
features.

It never changes the pre-training: a forward hook on the trunk keeps a detached copy of its features of the
global views (inputs of image_size px: multi-crop's small crops are left out), the head's weights are drawn
inside a fork of the CPU generator and its checks' loader has a generator of its own (the trunk's stream never
moves), and its loss has a graph of its own.
Under torchrun its gradients and its batch statistics are those of the global batch (two all_reduces of small
tensors). Its weights, statistics and momentum are in every checkpoint (Checkpointer), so a resumed run is exact.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.augment import eval_transform
from common.checkpoints import load_state
from common.config import UsageError
from common.data import Transformed, labelled_split, labels_of
from common.knn import extract_features, topk_correct


class GlobalBatchNorm(nn.Module):
    """BatchNorm1d without affine parameters whose batch statistics are those of the global batch (one all_reduce
    of this rank's first and second moments under torchrun): the features standardised, so that one probe lr
    suits any trunk's feature scale. In eval mode it applies the running statistics: an affine map that the linear
    layer after it absorbs, so the probe stays a linear classifier of the features (MAE's and MoCo v3's probes)."""

    def __init__(self, width, momentum=0.1, eps=1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, x):  # x: detached features, N x width, fp32
        if not self.training:
            return (x - self.running_mean) / (self.running_var + self.eps).sqrt()
        moments = torch.stack([x.double().mean(0), x.double().pow(2).mean(0)])  # fp64: E[x^2] - E[x]^2 stays exact
        if dist.is_initialized() and dist.get_world_size() > 1:  # equal batches: the mean of the ranks' means
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        mean, var = moments[0].float(), (moments[1] - moments[0] ** 2).clamp(min=0).float()
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var, self.momentum)
        return (x - mean) / (var + self.eps).sqrt()


class OnlineProbe:
    """A linear classifier on model.backbone's features (after GlobalBatchNorm: still linear in them), off when
    cfg.probe_every is 0. step() trains it on the features that the trunk's forward of this step produced (SGD,
    momentum 0.9, no weight decay, at the lr the script's schedule gives it); after_epoch() evaluates it. Images
    labelled -1 (STL-10's unlabelled split) are left out of its loss."""

    def __init__(self, cfg, model, images, rank, world_size, device, precision):
        self.cfg, self.rank, self.world_size, self.device, self.precision = cfg, rank, world_size, device, precision
        self.on = cfg.probe_every > 0
        if not self.on:
            return
        labels = labels_of(images)
        if max(labels, default=-1) < 0:
            raise UsageError(f"the online probe needs class labels, and the pre-training images of {cfg.dataset} in "
                             f"{cfg.data_dir!r} have none; give the folder one sub-folder per class, or set "
                             "--probe_every 0")
        val = labelled_split(cfg.dataset, cfg.data_dir, "val", cfg.download, cfg.image_size, cfg.bad_images)
        num_classes = max(max(labels), *labels_of(val)) + 1
        self.val = Transformed(val, eval_transform(cfg.image_size, cfg.dataset))
        with torch.random.fork_rng(devices=[]):  # drawn on the CPU, which then continues as if it had not been
            width = model.backbone.feature_width
            self.head = nn.Sequential(GlobalBatchNorm(width), nn.Linear(width, num_classes)).to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=0.0, momentum=0.9)
        self.backbone, self.features = model.backbone, []
        self.backbone.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        """The forward hook: a training forward of the global views keeps their features (detached)."""
        if module is self.backbone and module.training and args[0].shape[-1] == self.cfg.image_size:
            self.features.append(output.detach())

    def step(self, labels, lr):
        """One SGD step of the head on the features kept since the last step (each view's rows, in the order the
        trunk saw them), at this lr. Returns the values for StepMetrics ({} when the probe is off); reads nothing
        back to the host. A step whose gradient is not finite (a trunk's non-finite step) leaves the probe as it
        was."""
        if not self.on:
            return {}
        features, self.features = torch.cat(self.features).float(), []
        if len(features) % len(labels):  # shapes, known on the host: no sync
            raise RuntimeError(f"the probe kept {len(features)} feature rows for {len(labels)} labels")
        labels = labels.to(self.device, non_blocking=True)
        labels = labels.repeat(len(features) // len(labels))  # the views' rows: view 1's images, view 2's, ...
        params = list(self.head.parameters())
        kept = [*self.head.state_dict().values(), *(t for p in params for t in self.optimizer.state[p].values())]
        before = [t.clone() for t in kept]  # weights, running statistics and momentum, for a skipped step
        logits = self.head(features)
        labelled = labels >= 0  # images labelled -1 are left out
        loss_sum = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum.backward()
        # the sums of this rank's labelled images, then of the global batch's: their gradient, loss and hits
        hits = ((logits.argmax(1) == labels) & labelled).sum()
        sums = torch.cat([*(p.grad.flatten() for p in params), torch.stack([loss_sum.detach(), hits, labelled.sum()])])
        if self.world_size > 1:
            dist.all_reduce(sums)
        count = sums[-1]
        for p, g in zip(params, sums[:-3].split([p.numel() for p in params])):  # the mean over labelled images
            p.grad.copy_(g.view_as(p) / count.clamp(min=1))
        finite = torch.stack([p.grad.isfinite().all() for p in params]).all()
        for p in params:
            p.grad = torch.where(finite, p.grad, 0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():  # a skipped step leaves all as it was (a new momentum buffer is 0: as none)
            for t, old in zip(kept, before):
                t.copy_(torch.where(finite, t, old))
        nan = torch.full_like(count, float("nan"))  # a batch without labels: nothing to log
        return {"probe_loss": torch.where(count > 0, sums[-3] / count, nan),
                "probe_top1": torch.where(count > 0, 100.0 * sums[-2] / count, nan)}

    @torch.no_grad()
    def after_epoch(self, epoch, step, log):
        """Evaluate the probe on the val split, on the trunk it learns from, if `epoch` (1-based) is one of its
        epochs (every probe_every-th and the last): each rank classifies its shard; log eval/probe_top1 and
        eval/probe_top5."""
        if not self.on or (epoch % self.cfg.probe_every and epoch != self.cfg.epochs):
            return
        cfg = self.cfg
        features, labels = extract_features(self.backbone, self.val, 2 * cfg.batch_size, cfg.num_workers, self.device,
                                             self.precision, self.rank, self.world_size, gather=False)
        self.head.eval()  # the running statistics
        counts = torch.tensor([*topk_correct(self.head(features.float()), labels), len(labels)],
                              dtype=torch.float64, device=self.device)
        self.head.train()
        if self.world_size > 1:
            dist.all_reduce(counts)
        top1, top5 = (100.0 * counts[:2] / counts[2]).tolist()
        log.write(step=step, epoch=epoch, **{"eval/probe_top1": top1, "eval/probe_top5": top5})
        if self.rank == 0:
            tqdm.write(f"epoch {epoch}: online probe top-1 {top1:.2f}%  top-5 {top5:.2f}%")

    def state_dict(self):
        if not self.on:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state, path):
        """Resume the probe; a checkpoint of a run without it (probe_every was 0) leaves a new probe."""
        if not self.on:
            return
        if not state:
            if self.rank == 0:
                print(f"{path} holds no online probe (probe_every was 0): a new probe starts here", flush=True)
            return
        held = state["head"]["1.weight"].shape
        if held != self.head[1].weight.shape:  # another data set's classes: the trunk resumes, the probe is new
            if self.rank == 0:
                print(f"{path} holds an online probe of {held[0]} classes on {held[1]} features; this run's has "
                      f"{self.head[1].weight.shape[0]} on {self.head[1].weight.shape[1]}: a new probe starts here",
                      flush=True)
            return
        load_state(self.head, state["head"], path)
        load_state(self.optimizer, state["optimizer"], path)
