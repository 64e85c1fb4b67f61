"""CUDA graphs of the network's dense part: backbone, FPN and RPN head, per input shape.

The dense part reads no device data on the host, so it can be captured once per input shape
(batch size, padded height, padded width) and replayed: one graph launch replaces the few
hundred kernel launches of the convolutions. Post-processing (selection, NMS, RoIAlign, heads,
paste) keeps running eagerly. It reads nothing on the host until the detections per image,
right before the paste (:meth:`engine.predictor.Predictor.run`), but it uploads small host
tables (anchors, level tables, paste metadata) through pinned buffers that a captured graph
would replay from stale host addresses; capturing it too awaits a GPU to prove it on.

Shapes are not rounded up to buckets: a larger padded image changes the anchors and the top-k
per level, so a rounded shape would not give the eager results. Each new shape is captured
once (after two warm-up runs on a side stream), up to ``max_graphs`` shapes, least recently
used first out; the graph's input is a static tensor the batch is copied into, its outputs are
static tensors overwritten by the next replay (the pipeline has finished with them by then).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

__all__ = ["GraphedDenseNetwork"]


class GraphedDenseNetwork:
    """Replays ``dense(images) -> (features, logits, deltas)`` from CUDA graphs, one per input shape.

    Args:
        dense: the eager function (``MaskRCNN.dense_outputs``), pure in its input tensor.
        max_graphs: how many input shapes keep a graph (each holds its activations' memory).
    """

    def __init__(self, dense, *, max_graphs: int = 4) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_graph=True needs CUDA; on CPU use cuda_graph=False (the default)")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1; got {max_graphs}")
        self.dense = dense
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.captures = 0  # how many graphs were captured (tests and the benchmark read it)
        self.replays = 0

    def __call__(self, images: Tensor):
        if not images.is_cuda:
            raise ValueError(f"the graphed network runs CUDA tensors; got one on {images.device}")
        key = (tuple(images.shape), images.dtype, images.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(images)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_input, static_output = entry
        static_input.copy_(images)
        graph.replay()
        self.replays += 1
        return static_output

    def _capture(self, images: Tensor) -> tuple:
        static_input = images.clone()
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # cuDNN autotuning and lazy initialisation stay out of the graph
                self.dense(static_input)
        torch.cuda.current_stream(images.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.dense(static_input)
        self.captures += 1
        return graph, static_input, static_output
