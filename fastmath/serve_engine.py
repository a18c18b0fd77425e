"""The receiving end of server-mode weight sync: a vLLM weight-transfer engine over a torch.distributed group.

vLLM (0.32) serves the RL weight-update protocol itself (`/init_weight_transfer_engine`, `/start_weight_update`,
`/update_weights`, `/finish_weight_update`, with `VLLM_SERVER_DEV_MODE=1`) and hands each call to the engine named
by `--weight-transfer-config '{"backend": NAME}'`, looked up in `WeightTransferEngineFactory`. Its built-in
engines are CUDA-only (NCCL, CUDA IPC, ...); this one moves the bytes over a plain torch.distributed group, so
the same engine runs with gloo on CPU and NCCL on CUDA, for any number of servers (each server's workers get
ranks after the trainer's sender; see `fastmath.weight_wire`).

Loading follows vLLM's own NCCL engine: `start_weight_update` opens vLLM's layerwise reload (checkpoint-format
names, each layer re-processed once all its tensors arrived), each bucket goes through the model's
`load_weights`, `finish_weight_update` closes the reload.

The engine must be registered in the process that builds the vLLM worker. vLLM imports the class named by
`--worker-extension-cls` in every worker before it creates the worker's engine, so the launcher
(`python -m fastmath.serve`) names `WorkerHook` below: importing this module registers the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from fastmath.weight_wire import BucketLayout, broadcast_bucket, open_group, unpack_bucket

ENGINE_NAME = "fastmath_collective"


@dataclass
class CollectiveInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int      # this server's first rank in the group (the trainer's sender is rank 0)
    world_size: int       # 1 + every server's workers
    backend: str          # "gloo" or "nccl"
    timeout_s: float


@dataclass
class CollectiveUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class CollectiveWeightEngine(WeightTransferEngine[CollectiveInitInfo, CollectiveUpdateInfo]):
    init_info_cls = CollectiveInitInfo
    update_info_cls = CollectiveUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: CollectiveInitInfo) -> None:
        # This worker's rank among the server's workers (data-parallel replicas, then TP x PP), after the offset.
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.group = open_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.backend, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which has no device to wait for on CPU.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: CollectiveUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("fastmath weight transfer: /init_weight_transfer_engine was not called")
        layout = BucketLayout(update_info.names, update_info.dtype_names, update_info.shapes)
        flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        broadcast_bucket(self.group, flat)
        self.model.load_weights(unpack_bucket(layout, flat))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        self.group = None


class WorkerHook:
    """Named by `--worker-extension-cls` only so that vLLM imports this module in each worker; adds nothing."""


try:
    WeightTransferEngineFactory.register_engine(ENGINE_NAME, CollectiveWeightEngine)
except ValueError:  # already registered: this module was imported before in this process
    pass
