"""Model loading and parallelisation: any `AutoModelForCausalLM`, packed attention, fused loss, FSDP2.

The order of wrapping is fixed (as in torchtitan): load single-device model -> activation
checkpointing -> torch.compile per layer -> FSDP2 `fully_shard` per decoder layer, then the root.
The root is `CausalLMWithLinearLoss`, which runs the decoder to its final hidden states and hands
them with the `lm_head` weight to the linear cross-entropy, so no [tokens, vocab] logits tensor is
ever built. Making it the FSDP root matters: FSDP2 gathers the root's own parameters (embeddings,
final norm, lm_head) in the root's forward hook, which a call to `model.model` alone would bypass.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastmath.config import ModelConfig
from fastmath.errors import ConfigError, ModelError, one_line
from fastmath.packing import PackedBatch
from kernels import fused_linear_cross_entropy


# Files that mark a folder as an HF model: its config, some tokenizer file, and the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id: it starts with '.', '/' or '~', or it exists here."""
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()


def model_folder_problem(path: Path) -> str | None:
    """Why a local path is not a loadable HF model folder (as the end of a sentence), or None."""
    if not path.exists():
        return "was not found"
    if not path.is_dir():
        return "is a file, not a model folder (an HF model folder holds config.json, the weights and the tokenizer files)"
    if next(path.iterdir(), None) is None:
        return ("is an empty folder, not an HF model folder (which holds config.json, tokenizer files such as "
                "tokenizer.json, and the weights, *.safetensors or *.bin)")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors / *.bin)")
    return f"is not an HF model folder: it has no {', no '.join(missing)}" if missing else None


def resolve_model_path(name_or_path: str, cache_dir: str, key: str = "model path") -> str:
    """'embedded' -> the locally built tiny model; a local path must be a model folder; a hub id passes as is.

    `key` names the setting in the error (for example 'model.name_or_path')."""
    if name_or_path == "embedded":
        from fastmath.embedded import ensure_embedded_assets

        return str(ensure_embedded_assets(cache_dir or None).model_dir)
    if not looks_local(name_or_path):
        return name_or_path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(f"{key} not found: {name_or_path}")
    problem = model_folder_problem(path)
    if problem:
        raise ModelError(f"{key} {name_or_path} {problem}")
    return str(path)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError for missing files / hub, ValueError for unknown classes
        raise ModelError(f"could not load the tokenizer: {_load_problem(path, err)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_problem(path: str, err: Exception) -> str:
    """The cause of a failed load, naming the path: what a local folder lacks, else transformers' message on one
    line (its own runs over several, and the first alone stops mid-sentence)."""
    if looks_local(path):
        problem = model_folder_problem(Path(path).expanduser())
        if problem:
            return f"{path} {problem}"
    return f"'{path}': {one_line(err)}"


def use_liger(setting: str, device: torch.device) -> bool:
    """Whether a trained model gets Liger-Kernel's RMSNorm / SwiGLU / RoPE (`model.liger`): never; always (a
    ConfigError when it cannot run: Liger's kernels are Triton, CUDA only); auto = when both hold."""
    if setting == "never":
        return False
    from kernels.hf import liger_import_problem

    problem = f"the device is {device.type}, and Liger's kernels run on CUDA only" if device.type != "cuda" else None
    problem = problem or liger_import_problem()
    if problem and setting == "always":
        raise ConfigError(f"model.liger=always, but {problem}; set model.liger=auto or never")
    return problem is None


def load_causal_lm(path: str, attn_implementation: str, trust_remote_code: bool = False, liger: str = "never",
                   device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                   on_meta: bool = False) -> nn.Module:
    """Load an HF causal LM (fp32 master weights by default) with packed attention registered, and Liger-Kernel's
    modules when `use_liger(liger, device)` (decided before loading, so `always` fails fast). on_meta: build it
    from its config on the meta device, weights unread (`fastmath.sharded_load` fills each rank's shard later)."""
    from transformers import AutoModelForCausalLM

    with_liger = use_liger(liger, device or torch.device("cpu"))
    if attn_implementation == "fastmath_varlen":
        from kernels.hf import register

        register()
    if on_meta:
        from fastmath.sharded_load import build_on_meta

        model = build_on_meta(path, attn_implementation, trust_remote_code, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                         trust_remote_code=trust_remote_code)
        except Exception as err:
            raise ModelError(f"could not load the model: {_load_problem(path, err)}") from None
    model.config.use_cache = False
    if with_liger:
        from kernels.hf import apply_liger

        apply_liger(model)
    return model


class CausalLMWithLinearLoss(nn.Module):
    """Packed row -> summed next-token loss, through final hidden states and lm_head (no logits)."""

    def __init__(self, causal_lm: nn.Module, chunk_bytes: int | None = None):
        super().__init__()
        self.causal_lm = causal_lm
        self.chunk_bytes = chunk_bytes
        # Gemma-2-style models cap their logits (c * tanh(z / c)); the loss applies the same cap per chunk.
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None) or None

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        decoder = self.causal_lm.get_decoder()
        cu = batch.cu_seqlens
        hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                         cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                         max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen).last_hidden_state
        head = self.causal_lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # The loss is a custom op that autocast does not see: run its matmuls in the autocast dtype, as
            # the lm_head matmul would be (the residual stream, and so `hidden`, stays fp32 under autocast).
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return fused_linear_cross_entropy(hidden.flatten(0, 1), weight, batch.targets.flatten(), bias=bias,
                                          reduction="sum", chunk_bytes=self.chunk_bytes, softcap=self.softcap)


def export_dtype(model_config: ModelConfig, bf16: bool) -> torch.dtype:
    """model.export_dtype as a torch dtype ('auto': bf16 when the run computes in bf16, else fp32)."""
    name = model_config.export_dtype
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def lm_head_chunk_bytes(model_config: ModelConfig) -> int | None:
    """model.lm_head_chunk_mib as the kernels' chunk_bytes (None: their default budget)."""
    return model_config.lm_head_chunk_mib * 2**20 or None


def mixed_precision(precision: str, device: torch.device):
    """(bf16, autocast): whether `model.precision` means bf16 autocast here ('auto' = on CUDA only), and a
    zero-argument factory of the matching autocast context (disabled, so fp32, otherwise)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    return bf16, autocast


def decoder_layers(causal_lm: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (FSDP and checkpointing units)."""
    layers = getattr(causal_lm.get_decoder(), "layers", None)
    if layers is None:
        raise ModelError(f"{type(causal_lm).__name__} has no `.layers` on its decoder; cannot shard it")
    return list(layers)


def fsdp_mesh(world_size: int, replicate: int, device: torch.device):
    """The device mesh FSDP2 shards over: 1-D over every rank, or (replicate, world / replicate) for HSDP, where
    parameters are sharded along the second dimension (within a node when replicate = nodes) and replicated
    along the first (gradients all-reduced across replicas after the reduce-scatter within each)."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicate < 1 or world_size % replicate:
        raise ConfigError(f"parallel.replicate ({replicate}) must divide the number of processes ({world_size})")
    if replicate == 1:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def parallelize(wrapper: CausalLMWithLinearLoss, world_size: int, device: torch.device,
                activation_checkpointing: bool, compile_layers: bool, bf16: bool, replicate: int = 1,
                mesh=None) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2 in that order; returns the module to train.

    With several processes the parameters stay where they are (the meta device for a model built by
    `load_parallel_model`, which then fills each shard), else the model moves to `device`."""
    causal_lm = wrapper.causal_lm
    if activation_checkpointing:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_layers:
        for layer in decoder_layers(causal_lm):
            layer.compile(dynamic=True)  # packed rows differ in length every step
    if world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = mesh if mesh is not None else fsdp_mesh(world_size, replicate, device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in decoder_layers(causal_lm):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(wrapper, mesh=mesh, mp_policy=policy)
    elif not any(p.is_meta for p in wrapper.parameters()):  # a meta model gets its storage from its builder
        wrapper.to(device)
    return wrapper


def load_parallel_model(path: str, wrap, model_config: ModelConfig, dist_info, bf16: bool, replicate: int = 1,
                        trainable: bool = True) -> tuple[nn.Module, nn.Module]:
    """(HF model, wrapped and parallelised model) for a stage: the trained policy, or (trainable=False) a frozen
    reference kept in the compute dtype (bf16 under mixed precision: it never steps, so it needs no fp32 master
    copy, half the bytes). `wrap` turns the HF model into the stage's loss module.

    One process: `from_pretrained` and a move to the device. Several: built on the meta device, sharded, then
    each rank reads only its shard's rows (`fastmath.sharded_load`): no rank ever holds the full model."""
    m = model_config
    dtype = torch.float32 if trainable or not bf16 else torch.bfloat16
    sharded = dist_info.world_size > 1
    causal_lm = load_causal_lm(path, m.attn_implementation, m.trust_remote_code, m.liger, dist_info.device,
                               dtype=dtype, on_meta=sharded)
    if not trainable:
        causal_lm.requires_grad_(False)
    model = parallelize(wrap(causal_lm), dist_info.world_size, dist_info.device,
                        m.activation_checkpointing and trainable, m.compile, bf16, replicate)
    if sharded:
        from fastmath.sharded_load import materialize_from_safetensors

        if not looks_local(path):
            path = _download(path)
        materialize_from_safetensors(causal_lm, path, dist_info.device)
    return causal_lm, model


def _download(model_id: str) -> str:
    """A hub id's local snapshot folder (config and safetensors only; each rank finds the same cached copy)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:
        raise ModelError(f"could not fetch '{model_id}': {one_line(err)}") from None


def count_parameters(causal_lm: nn.Module) -> dict[str, int]:
    """Total parameters and the ones that cost matmul FLOPs (all but the input embedding table).

    With tied embeddings the table is also the lm_head, which does cost 2*V*d FLOPs per token forward,
    so it is counted once in `matmul`.
    """
    seen, total = set(), 0
    for p in causal_lm.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embed = causal_lm.get_input_embeddings().weight
    head = causal_lm.get_output_embeddings().weight
    matmul = total if head is embed else total - embed.numel()
    return {"total": total, "matmul": matmul}
