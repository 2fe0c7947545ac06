// Trains a small MLA transformer language model from C++ alone (LibTorch + torch_mla): token
// embedding, N pre-norm blocks of RMSNorm + MultiHeadLatentAttention + SwiGLU MLP, final norm and
// LM head, AdamW, on the CPU (or --device cuda). The task is embedded: copy a random sequence
// after a separator,
//   a b c ... SEP a b c ...
// scored on the copied half only, which attention alone can solve (the first half is random and
// cannot be predicted). Prints loss and tokens/s; exits non-zero unless the loss falls below
// --max-final-ratio of its starting value.
#include <torch/torch.h>
#include <torch_mla/torch_mla.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

struct Config {
  int64_t steps = 300;
  int64_t batch = 32;
  int64_t copy_len = 24;   // sequence length 2 * copy_len + 1
  int64_t symbols = 16;    // vocabulary: the symbols and SEP
  int64_t hidden = 64;
  int64_t layers = 2;
  int64_t heads = 4;
  double lr = 3e-3;
  double max_final_ratio = 0.2;
  int64_t log_every = 25;
  uint64_t seed = 0;
  std::string device = "cpu";
  // The model is tiny: intra-op threads cost more in hand-offs than they save (and torch_mla's
  // CPU kernel slows down badly with 2 threads on a busy machine).
  int threads = 1;
};

// The MLP of a DeepSeek dense layer: down(silu(gate(x)) * up(x)).
class MlpImpl : public torch::nn::Module {
 public:
  MlpImpl(int64_t hidden, int64_t intermediate)
      : gate_proj(register_module("gate_proj", torch::nn::Linear(torch::nn::LinearOptions(hidden, intermediate).bias(false)))),
        up_proj(register_module("up_proj", torch::nn::Linear(torch::nn::LinearOptions(hidden, intermediate).bias(false)))),
        down_proj(register_module("down_proj", torch::nn::Linear(torch::nn::LinearOptions(intermediate, hidden).bias(false)))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return down_proj(torch::silu(gate_proj(x)) * up_proj(x));
  }
  torch::nn::Linear gate_proj, up_proj, down_proj;
};
TORCH_MODULE(Mlp);

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const Config& c)
      : input_layernorm(register_module("input_layernorm", torch_mla::RMSNorm(c.hidden))),
        self_attn(register_module(
            "self_attn", torch_mla::MultiHeadLatentAttention(
                             torch_mla::MultiHeadLatentAttentionOptions(c.hidden, c.heads)
                                 .q_lora_rank(32)
                                 .kv_lora_rank(32)
                                 .qk_nope_head_dim(16)
                                 .qk_rope_head_dim(8)
                                 .v_head_dim(16)))),
        post_attention_layernorm(register_module("post_attention_layernorm", torch_mla::RMSNorm(c.hidden))),
        mlp(register_module("mlp", Mlp(c.hidden, 4 * c.hidden))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = x + self_attn(input_layernorm(x));
    return x + mlp(post_attention_layernorm(x));
  }
  torch_mla::RMSNorm input_layernorm;
  torch_mla::MultiHeadLatentAttention self_attn;
  torch_mla::RMSNorm post_attention_layernorm;
  Mlp mlp;
};
TORCH_MODULE(Block);

class LanguageModelImpl : public torch::nn::Module {
 public:
  explicit LanguageModelImpl(const Config& c)
      : embed_tokens(register_module("embed_tokens", torch::nn::Embedding(c.symbols + 1, c.hidden))),
        layers(register_module("layers", torch::nn::ModuleList())),
        norm(register_module("norm", torch_mla::RMSNorm(c.hidden))),
        lm_head(register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(c.hidden, c.symbols + 1).bias(false)))) {
    for (int64_t i = 0; i < c.layers; ++i) layers->push_back(Block(c));
  }
  // tokens (B, S) int64 -> logits (B, S, vocab)
  torch::Tensor forward(const torch::Tensor& tokens) {
    torch::Tensor x = embed_tokens(tokens);
    for (const auto& layer : *layers) x = layer->as<Block>()->forward(x);
    return lm_head(norm(x));
  }
  torch::nn::Embedding embed_tokens;
  torch::nn::ModuleList layers;
  torch_mla::RMSNorm norm;
  torch::nn::Linear lm_head;
};
TORCH_MODULE(LanguageModel);

// A batch of copy sequences: inputs (B, 2L) and targets (B, 2L), targets -100 (ignored) where
// the next token is one of the random first half.
std::pair<torch::Tensor, torch::Tensor> copy_batch(const Config& c, const torch::Device& device) {
  const auto payload = torch::randint(c.symbols, {c.batch, c.copy_len}, torch::kLong);
  const auto sep = torch::full({c.batch, 1}, c.symbols, torch::kLong);
  const auto seq = torch::cat({payload, sep, payload}, 1);
  const auto inputs = seq.narrow(1, 0, 2 * c.copy_len);
  auto targets = seq.narrow(1, 1, 2 * c.copy_len).clone();
  targets.narrow(1, 0, c.copy_len).fill_(-100);
  return {inputs.to(device), targets.to(device)};
}

bool parse(int argc, char** argv, Config& c) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return arg == "--help" ? false : (std::fprintf(stderr, "missing value for %s\n", arg.c_str()), false);
    const char* v = argv[++i];
    if (arg == "--steps") c.steps = std::atoll(v);
    else if (arg == "--batch") c.batch = std::atoll(v);
    else if (arg == "--copy-len") c.copy_len = std::atoll(v);
    else if (arg == "--layers") c.layers = std::atoll(v);
    else if (arg == "--lr") c.lr = std::atof(v);
    else if (arg == "--max-final-ratio") c.max_final_ratio = std::atof(v);
    else if (arg == "--log-every") c.log_every = std::atoll(v);
    else if (arg == "--seed") c.seed = std::strtoull(v, nullptr, 10);
    else if (arg == "--device") c.device = v;
    else if (arg == "--threads") c.threads = std::atoi(v);
    else return (std::fprintf(stderr, "unknown argument %s\n", arg.c_str()), false);
  }
  return c.steps >= 20 && c.batch > 0 && c.copy_len > 0 && c.layers > 0 && c.threads > 0;
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  if (!parse(argc, argv, c)) {
    std::fprintf(stderr,
                 "usage: train_mla [--steps N>=20] [--batch N] [--copy-len N] [--layers N] [--lr X]\n"
                 "                 [--max-final-ratio X] [--log-every N] [--seed N] [--device cpu|cuda]\n"
                 "                 [--threads N]\n");
    return 2;
  }
  torch::set_num_threads(c.threads);
  torch::manual_seed(c.seed);
  const torch::Device device(c.device);
  LanguageModel model(c);
  model->to(device);
  int64_t num_params = 0;
  for (const auto& p : model->parameters()) num_params += p.numel();
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(c.lr).weight_decay(0.01));
  const int64_t tokens_per_step = c.batch * 2 * c.copy_len;
  std::printf("train_mla: %lld layers, hidden %lld, %lld heads, %lld parameters; copy task, %lld "
              "symbols, sequence %lld, batch %lld, %lld steps, %s, %d threads\n",
              (long long)c.layers, (long long)c.hidden, (long long)c.heads, (long long)num_params,
              (long long)c.symbols, (long long)(2 * c.copy_len), (long long)c.batch,
              (long long)c.steps, c.device.c_str(), torch::get_num_threads());

  // The loss of the first and last 10 steps, averaged: single steps are noisy.
  const int64_t window = 10;
  double first = 0.0, last = 0.0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= c.steps; ++step) {
    const auto [inputs, targets] = copy_batch(c, device);
    const auto logits = model(inputs);
    const auto loss = torch::nn::functional::cross_entropy(
        logits.flatten(0, 1), targets.flatten(),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
    optimizer.zero_grad();
    loss.backward();
    torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
    optimizer.step();

    const double value = loss.item<double>();
    if (step <= window) first += value / window;
    if (step > c.steps - window) last += value / window;
    if (step == 1 || step % c.log_every == 0 || step == c.steps) {
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("step %5lld  loss %.4f  %.0f tokens/s\n", (long long)step, value,
                  step * tokens_per_step / seconds);
      std::fflush(stdout);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("loss: first %d steps %.4f, last %d steps %.4f (ratio %.3f); %.0f tokens/s over %.1f s\n",
              (int)window, first, (int)window, last, last / first, c.steps * tokens_per_step / seconds, seconds);
  if (!(last <= c.max_final_ratio * first)) {
    std::fprintf(stderr, "train_mla: FAILED, the loss did not fall below %.2f of its start\n", c.max_final_ratio);
    return 1;
  }
  std::printf("train_mla: OK, the loss fell below %.2f of its start\n", c.max_final_ratio);
  return 0;
}
