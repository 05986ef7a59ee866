"""distributed.py's FSDP2 model as train.py builds it, in this process (gloo, one rank): what the
mixed-precision policy does to the blocks' inputs and to the gradients."""

import os

import pytest
import torch
import torch.distributed as dist

import distributed
import train
from model import ModelArgs, Transformer

TINY = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def built(shard=True, **options):
    # shard=True: the sharded model as on two or more ranks, built in this group of one
    cfg = train.TrainConfig(**options)
    torch.manual_seed(0)
    source = Transformer(TINY)
    source.init_weights()
    return distributed.build_model(cfg, TINY, source.state_dict().items(), torch.device("cpu"), shard=shard)


def test_rope_angles_reach_the_blocks_in_fp32_under_bf16_compute(group):
    # FSDP2 casts a module's float inputs to the compute dtype unless told not to; the RoPE
    # angles must stay fp32 (in bf16 they carry ~0.1% error into every rotated query and key)
    model = built(compute_dtype="bfloat16")
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[1].dtype, args[2].dtype)))
    tokens = torch.randint(0, TINY.vocab_size, (1, 12))
    logits = model(tokens)
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)]  # x in bf16; cos, sin in fp32
    assert logits.dtype == torch.float32


def test_bf16_master_weights_use_stochastic_rounding_and_fp32_reduction(group):
    model = built(param_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    policy = model.layers[0]._get_fsdp_state()._mp_policy
    assert policy.reduce_dtype == torch.float32  # gradients are summed over ranks in fp32
    opt = train.make_optimizer(model, train.TrainConfig(param_dtype="bfloat16"))
    import optim
    assert isinstance(opt, optim.AdamW)
    assert isinstance(train.make_optimizer(built(), train.TrainConfig()), torch.optim.AdamW)


def test_one_process_shards_only_where_fsdp2_does_something(group):
    # FSDP2 over one rank shards nothing; it earns its copies only by casting to a compute
    # dtype or offloading. The plain model it leaves out is the same model, weights and all.
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def uses(world_size, device=cpu, **options):
        return distributed.uses_fsdp(train.TrainConfig(**options), device, world_size)

    assert not uses(1) and not uses(1, param_dtype="bfloat16")
    assert uses(2) and uses(1, compute_dtype="bfloat16") and uses(1, cpu_offload=True)
    assert uses(1, cuda)  # a GPU: fp32 master weights, bf16 matmuls
    assert not uses(1, cuda, param_dtype="bfloat16")
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    plain, sharded = built(shard=None), built(shard=True)
    assert not isinstance(plain, FSDPModule) and isinstance(sharded, FSDPModule)
    assert not any(isinstance(p, DTensor) for p in plain.parameters())
    for (name, p), (_, q) in zip(plain.named_parameters(), sharded.named_parameters()):
        assert torch.equal(p, q.full_tensor()), name
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    assert torch.allclose(plain(tokens), sharded(tokens), atol=1e-6)
    tied = ModelArgs(**{**TINY.__dict__, "tie_embeddings": True})
    m = distributed.build_model(train.TrainConfig(), tied, Transformer(tied).named_parameters(), cpu)
    assert m.output.weight is m.tok_embeddings.weight  # to_empty untied them; build_model ties again


def test_gpu_process_groups_carry_a_cpu_backend_for_offloaded_gradients(monkeypatch):
    # --cpu_offload keeps gradients in host memory; clipping all-reduces their norm where they
    # live, which NCCL cannot do: the group needs gloo beside NCCL (measured on an H200: with it,
    # the offloaded 1.2B run clips and steps; benchmarks/gpu_h200.md)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: asked.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", env)  # setup_distributed writes a group of one here
    device, _, _ = distributed.setup_distributed("cuda")
    assert asked == ["cuda:nccl,cpu:gloo"] and device == torch.device("cuda:0")
