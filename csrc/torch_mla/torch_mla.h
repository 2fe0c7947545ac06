#pragma once
// torch_mla's C++ API, one include for LibTorch users:
//   torch_mla::mla_attention(q, kv_latent, k_rope, wkv_b, torch_mla::MlaOptions())  (autograd)
//   torch_mla::MultiHeadLatentAttention (torch::nn module, Hugging Face parameter names)
//   torch_mla::RMSNorm
//   torch_mla::dsa_indexer_topk(index_q, index_k, weights, topk, cu_seqlens, max_seqlen)  (no autograd)
//   torch_mla::dsa_indexer_loss(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse,
//                               torch_mla::IndexerLossOptions())  (autograd to the indexer's tensors)
// Link with TorchMLA::torch_mla (find_package(TorchMLA)). The raw dispatcher ops (returning lse,
// and the backward) are in torch_mla/ops/mla_attention.h.
#include "torch_mla/api/functional.h"
#include "torch_mla/api/module.h"
#include "torch_mla/ops/mla_attention.h"
#include "torch_mla/ops/dsa_indexer_topk.h"
