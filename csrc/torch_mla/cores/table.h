#pragma once
// The one table of attention cores (docs/design.md §10.3): every core's name, the device it runs
// on, whether `auto` may pick it, and why it cannot serve a call, as pure functions of the call's
// metadata so that the rule is tested on any machine. Names, auto order, explain's lines and the
// error listing the cores all come from this table; Python asks it (torch_mla.cores.names()).
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace torch_mla {

// The metadata selection looks at; never tensor data.
struct CoreQuery {
  c10::DeviceType device = c10::DeviceType::CPU;
  int capability = 0;  // CUDA compute capability as 10·major + minor (90 = sm_90); 0 off CUDA
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t dim_nope = 0, dim_rope = 0, dim_v = 0;
  bool varlen = false;
  bool deterministic = false;
  int64_t cudnn_version = 0;      // the torch build's cuDNN as 10000·major + 100·minor + patch; 0: none
  std::vector<int> kernel_archs;  // archs our CUDA kernels were compiled for; empty: not compiled
  bool simt_built = false;        // the SIMT-emulated kernels are in this build

  bool operator==(const CoreQuery& other) const;
};

using Reason = std::optional<std::string>;  // why a core cannot serve a call; nullopt: it can

// One row of the table.
struct CoreEntry {
  const char* name;
  std::optional<c10::DeviceType> device;  // the only device it runs on; nullopt: any (composed)
  bool in_auto;                           // `auto` may pick it (simt, for tests, is never picked)
  Reason (*declines)(const CoreQuery&);   // the core's own limits, its device already matched
  // The core walks the sequences on the host (Sequences::spans): a packed call then copies
  // cu_seqlens to the host, a device sync on CUDA (docs/design.md §3.2). The cores that read
  // cu_seqlens on the device need only max_seqlen.
  bool host_spans;
  // The limits of the core's sparse form (docs/design.md §16.4), its device already matched;
  // nullptr: the core has no sparse form.
  Reason (*sparse_declines)(const CoreQuery&) = nullptr;
};

// Every core, in the order `auto` tries them (on each device, the rows of that device and of any).
const std::vector<CoreEntry>& core_table();

// The names of core_table(), in its order.
std::vector<std::string> core_names();

// The core for `core` ("auto" or a core name). "auto": the first core of the table for the
// query's device that can serve it. A name: that core, or a ValueError naming why it cannot and
// which can. Reason strings are built for a failure (and by explain_choice), not for a call served.
// `sparse`: the same rule over the cores' sparse forms (docs/design.md §16.4); a core without one
// cannot serve.
std::string choose_core(const CoreQuery& query, const std::string& core, bool sparse = false);

// Why `entry` (its sparse form when `sparse`) cannot serve the query, or nullopt.
Reason entry_declines(const CoreEntry& entry, const CoreQuery& query, bool sparse);

// The table's row named `name`, or nullptr.
const CoreEntry* find_entry(const std::string& name);

// How many "auto" selections resolve_core_name has made in this process (a test hook,
// torch.ops.torch_mla._core_selections: one per call of an op, forward and backward, whichever of
// its layers and head groups run, docs/design.md §10.1).
int64_t core_selections();

// The environment variables the ops obey, read once (a getenv per call would sit on the hot
// path); read_environment() reads them again (a test hook, torch.ops.torch_mla._read_environment).
struct Environment {
  std::string core;                   // TORCH_MLA_CORE, else the older TORCH_MLA_BACKEND; "" if unset
  bool recompute_max_logits = false;  // TORCH_MLA_MAX_LOGITS=recompute (docs/design.md §12.2)
};
const Environment& environment();
void read_environment();

// The query of a call on tensors like `like` (device, dtype) with these head dims; fills in the
// device's capability, the torch build's cuDNN, what this build compiled and the determinism flag.
CoreQuery query_for(const at::Tensor& like, const c10::SymInt& dim_nope, const c10::SymInt& dim_rope,
                    const c10::SymInt& dim_v, bool varlen);

// `core`, with "auto" replaced by the environment's TORCH_MLA_CORE when that is set (the older
// TORCH_MLA_BACKEND is read too, for one release; both read once, environment()).
std::string requested_core(const std::string& core);

// The concrete core name a call takes (what the autograd Functions record for the backward): a
// selection for "auto", else only the named core's own limits are checked (a name the layer above
// resolved is trusted to that extent, docs/design.md §10.1). Tensors on devices without cores
// (e.g. meta) keep the request as it is, once it is checked to name a core.
std::string resolve_core_name(const at::Tensor& like, const c10::SymInt& dim_nope,
                              const c10::SymInt& dim_rope, const c10::SymInt& dim_v, bool varlen,
                              const std::string& core);

// choose_core as text, for torch_mla.explain: the chosen core on the first line, then one line per
// core, "name: yes" or "name: no: why". `sparse`: over the cores' sparse forms, for a sparse call
// whose `core` is already resolved (resolve_sparse_core); the dense shortcut, which depends on the
// indices, is the caller's to add (ops/cores.cpp).
std::string explain_choice(const CoreQuery& query, const std::string& core, bool sparse = false);

// The archs this build compiled the `cuda` core for (CMake's TORCH_MLA_CUDA_ARCHS); empty when it
// has no CUDA kernels.
std::vector<int> compiled_kernel_archs();

// The CUDA compute capability of a device (10·major + minor), 0 when unknown. Implemented where
// the CUDA runtime headers are available (cores/cuda_capability.cpp).
int cuda_capability(c10::DeviceIndex index);

}  // namespace torch_mla
