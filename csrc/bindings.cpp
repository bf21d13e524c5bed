// Python bindings. Deliberately free of torch headers: tensors cross as integer addresses plus sizes,
// so the module builds under plain `pip install -e .` against any torch. mvmae_fast/_ext.py and the
// op modules validate every argument before calling in here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include <stdexcept>
#include <string>

#include "ops.h"

namespace py = pybind11;
using namespace mvmae_fast;

namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check_index_bytes(int index_bytes) {
  if (index_bytes != 4 && index_bytes != 8)
    throw std::invalid_argument("index_bytes must be 4 (int32) or 8 (int64)");
}

void check_cpu_dtype(int dtype) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype must be 0 (float32), 1 (bfloat16) or 2 (float16)");
}

void raise_status(int status, const char* op) {
  if (status == kIndexOutOfRange) throw py::index_error(std::string(op) + ": index out of range");
  if (status == kDuplicateIndex) throw py::value_error(std::string(op) + ": duplicate index");
}

// Runs a kernel call that returns a status (kOk or an error code) without the GIL, then raises the
// error it reported, naming the op.
template <class Fn>
void run_checked(const char* op, const Fn& call) {
  int status;
  {
    py::gil_scoped_release release;
    status = call();
  }
  raise_status(status, op);
}

#ifdef MVMAE_FAST_WITH_CUDA
void raise_cuda(const std::string& error, const char* op) {
  if (!error.empty()) throw std::runtime_error(std::string(op) + ": CUDA error: " + error);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mvmae_fast native kernels (CPU, and CUDA when built with nvcc)";
#ifdef MVMAE_FAST_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif

  m.def(
      "random_masking_cpu",
      [](uintptr_t ids_keep, uintptr_t ids_restore, uintptr_t mask, int64_t batch,
         int64_t num_patches, int64_t keep, uint32_t s0, uint32_t s1, int threads) {
        py::gil_scoped_release release;
        random_masking_cpu(ptr<int64_t>(ids_keep), ptr<int64_t>(ids_restore), ptr<float>(mask),
                           batch, num_patches, keep, s0, s1, threads);
      },
      py::arg("ids_keep"), py::arg("ids_restore"), py::arg("mask"), py::arg("batch"),
      py::arg("num_patches"), py::arg("keep"), py::arg("s0"), py::arg("s1"), py::arg("threads"));

  m.def(
      "gather_rows_cpu",
      [](uintptr_t x, uintptr_t ids, int index_bytes, uintptr_t out, int64_t batch,
         int64_t num_rows, int64_t num_ids, int64_t row_bytes, int threads) {
        check_index_bytes(index_bytes);
        run_checked("gather_rows", [&] {
          return gather_rows_cpu(ptr<const void>(x), ptr<const void>(ids), index_bytes,
                                 ptr<void>(out), batch, num_rows, num_ids, row_bytes, threads);
        });
      },
      py::arg("x"), py::arg("ids"), py::arg("index_bytes"), py::arg("out"), py::arg("batch"),
      py::arg("num_rows"), py::arg("num_ids"), py::arg("row_bytes"), py::arg("threads"));

  m.def(
      "scatter_rows_cpu",
      [](uintptr_t y, uintptr_t ids, int index_bytes, uintptr_t out, int64_t batch,
         int64_t num_rows, int64_t num_ids, int64_t row_bytes, int threads) {
        check_index_bytes(index_bytes);
        run_checked("scatter_rows", [&] {
          return scatter_rows_cpu(ptr<const void>(y), ptr<const void>(ids), index_bytes,
                                  ptr<void>(out), batch, num_rows, num_ids, row_bytes, threads);
        });
      },
      py::arg("y"), py::arg("ids"), py::arg("index_bytes"), py::arg("out"), py::arg("batch"),
      py::arg("num_rows"), py::arg("num_ids"), py::arg("row_bytes"), py::arg("threads"));

  m.def(
      "attention_forward_cpu",
      [](uintptr_t qkv, uintptr_t out, uintptr_t lse, int dtype, int64_t batch, int64_t seq,
         int64_t heads, int64_t head_dim, int64_t row_stride, int64_t batch_stride, int threads) {
        check_cpu_dtype(dtype);
        py::gil_scoped_release release;
        attention_forward_cpu(ptr<const void>(qkv), ptr<void>(out), ptr<float>(lse), dtype, batch, seq,
                              heads, head_dim, row_stride, batch_stride, threads);
      },
      py::arg("qkv"), py::arg("out"), py::arg("lse"), py::arg("dtype"), py::arg("batch"), py::arg("seq"),
      py::arg("heads"), py::arg("head_dim"), py::arg("row_stride"), py::arg("batch_stride"),
      py::arg("threads"));

  m.def("attention_bf16_dot", &attention_bf16_dot, py::arg("head_dim"),
        "Whether bfloat16 attention of this head dim runs its products on AVX512-BF16 (else float32).");

  m.def(
      "attention_backward_cpu",
      [](uintptr_t grad_out, uintptr_t qkv, uintptr_t out, uintptr_t lse, uintptr_t dqkv, int dtype,
         int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t row_stride,
         int64_t batch_stride, int threads) {
        check_cpu_dtype(dtype);
        py::gil_scoped_release release;
        attention_backward_cpu(ptr<const void>(grad_out), ptr<const void>(qkv), ptr<const void>(out),
                               ptr<const float>(lse), ptr<void>(dqkv), dtype, batch, seq, heads, head_dim,
                               row_stride, batch_stride, threads);
      },
      py::arg("grad_out"), py::arg("qkv"), py::arg("out"), py::arg("lse"), py::arg("dqkv"), py::arg("dtype"),
      py::arg("batch"), py::arg("seq"), py::arg("heads"), py::arg("head_dim"), py::arg("row_stride"),
      py::arg("batch_stride"), py::arg("threads"));

  m.def(
      "mlp_forward_cpu",
      [](uintptr_t x, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t norm_weight,
         uintptr_t norm_bias, float eps, bool residual, uintptr_t out, uintptr_t mean, uintptr_t rstd,
         uintptr_t hidden_out, int64_t rows, int64_t dim, int64_t hidden, int threads) {
        py::gil_scoped_release release;
        mlp_forward_cpu(ptr<const float>(x), ptr<const float>(w1), ptr<const float>(b1), ptr<const float>(w2),
                        ptr<const float>(b2), ptr<const float>(norm_weight), ptr<const float>(norm_bias), eps,
                        residual, ptr<float>(out), ptr<float>(mean), ptr<float>(rstd), ptr<float>(hidden_out), rows,
                        dim, hidden, threads);
      },
      py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("norm_weight"),
      py::arg("norm_bias"), py::arg("eps"), py::arg("residual"), py::arg("out"), py::arg("mean"), py::arg("rstd"),
      py::arg("hidden_out"), py::arg("rows"), py::arg("dim"), py::arg("hidden"), py::arg("threads"));

  m.def(
      "mlp_backward_cpu",
      [](uintptr_t grad_out, uintptr_t x, uintptr_t mean, uintptr_t rstd, uintptr_t norm_weight, uintptr_t norm_bias,
         bool residual, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t dx, uintptr_t dw1, uintptr_t db1,
         uintptr_t dw2, uintptr_t db2, uintptr_t dnorm_weight, uintptr_t dnorm_bias, uintptr_t hidden_in, int64_t rows,
         int64_t dim, int64_t hidden, int threads) {
        py::gil_scoped_release release;
        mlp_backward_cpu(ptr<const float>(grad_out), ptr<const float>(x), ptr<const float>(mean),
                         ptr<const float>(rstd), ptr<const float>(norm_weight), ptr<const float>(norm_bias), residual,
                         ptr<const float>(w1), ptr<const float>(b1), ptr<const float>(w2), ptr<float>(dx),
                         ptr<float>(dw1), ptr<float>(db1), ptr<float>(dw2), ptr<float>(db2), ptr<float>(dnorm_weight),
                         ptr<float>(dnorm_bias), ptr<const float>(hidden_in), rows, dim, hidden, threads);
      },
      py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("norm_weight"),
      py::arg("norm_bias"), py::arg("residual"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("dx"),
      py::arg("dw1"), py::arg("db1"), py::arg("dw2"), py::arg("db2"), py::arg("dnorm_weight"), py::arg("dnorm_bias"),
      py::arg("hidden_in"), py::arg("rows"), py::arg("dim"), py::arg("hidden"), py::arg("threads"));

  m.def(
      "norm_linear_forward_cpu",
      [](uintptr_t x, uintptr_t norm_weight, uintptr_t norm_bias, float eps, uintptr_t w, uintptr_t b,
         uintptr_t addend, uintptr_t out, uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t dim, int64_t out_dim,
         int threads) {
        py::gil_scoped_release release;
        norm_linear_forward_cpu(ptr<const float>(x), ptr<const float>(norm_weight), ptr<const float>(norm_bias), eps,
                                ptr<const float>(w), ptr<const float>(b), ptr<const float>(addend), ptr<float>(out),
                                ptr<float>(mean), ptr<float>(rstd), rows, dim, out_dim, threads);
      },
      py::arg("x"), py::arg("norm_weight"), py::arg("norm_bias"), py::arg("eps"), py::arg("w"), py::arg("b"),
      py::arg("addend"), py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("rows"), py::arg("dim"),
      py::arg("out_dim"), py::arg("threads"));

  m.def(
      "norm_linear_backward_cpu",
      [](uintptr_t grad_out, uintptr_t x, uintptr_t mean, uintptr_t rstd, uintptr_t norm_weight, uintptr_t norm_bias,
         uintptr_t w, uintptr_t addend, uintptr_t dx, uintptr_t dnorm_weight, uintptr_t dnorm_bias, uintptr_t dw,
         uintptr_t db, int64_t rows, int64_t dim, int64_t out_dim, int threads) {
        py::gil_scoped_release release;
        norm_linear_backward_cpu(ptr<const float>(grad_out), ptr<const float>(x), ptr<const float>(mean),
                                 ptr<const float>(rstd), ptr<const float>(norm_weight), ptr<const float>(norm_bias),
                                 ptr<const float>(w), ptr<const float>(addend), ptr<float>(dx),
                                 ptr<float>(dnorm_weight), ptr<float>(dnorm_bias), ptr<float>(dw), ptr<float>(db), rows,
                                 dim, out_dim, threads);
      },
      py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("norm_weight"),
      py::arg("norm_bias"), py::arg("w"), py::arg("addend"), py::arg("dx"), py::arg("dnorm_weight"),
      py::arg("dnorm_bias"), py::arg("dw"), py::arg("db"), py::arg("rows"), py::arg("dim"), py::arg("out_dim"),
      py::arg("threads"));

  // The autocast layers' elementwise kernels (cpu/autocast.cpp).
  m.def(
      "layer_norm_bf16_forward_cpu",
      [](uintptr_t x, uintptr_t gamma, uintptr_t beta, float eps, uintptr_t out, uintptr_t mean, uintptr_t rstd,
         int64_t rows, int64_t dim, int threads) {
        py::gil_scoped_release release;
        layer_norm_bf16_forward_cpu(ptr<const float>(x), ptr<const float>(gamma), ptr<const float>(beta), eps,
                                    ptr<uint16_t>(out), ptr<float>(mean), ptr<float>(rstd), rows, dim, threads);
      },
      py::arg("x"), py::arg("gamma"), py::arg("beta"), py::arg("eps"), py::arg("out"), py::arg("mean"),
      py::arg("rstd"), py::arg("rows"), py::arg("dim"), py::arg("threads"));
  m.def(
      "gelu_bf16_forward_cpu",
      [](uintptr_t pre, uintptr_t act, uintptr_t deriv, int64_t numel, int threads) {
        py::gil_scoped_release release;
        gelu_bf16_forward_cpu(ptr<const uint16_t>(pre), ptr<uint16_t>(act), ptr<uint16_t>(deriv), numel, threads);
      },
      py::arg("pre"), py::arg("act"), py::arg("deriv"), py::arg("numel"), py::arg("threads"));
  m.def(
      "cast_bf16_colsum_cpu",
      [](uintptr_t g, uintptr_t out, uintptr_t colsum, int64_t rows, int64_t cols, int threads) {
        py::gil_scoped_release release;
        cast_bf16_colsum_cpu(ptr<const float>(g), ptr<uint16_t>(out), ptr<float>(colsum), rows, cols, threads);
      },
      py::arg("g"), py::arg("out"), py::arg("colsum"), py::arg("rows"), py::arg("cols"), py::arg("threads"));
  m.def("linear_bf16_preferred", &linear_bf16_preferred,
        "Whether the CPU autocast layers call linear_bf16_* by default (supported, and no AMX for oneDNN)");
  m.def("linear_bf16_supported", &linear_bf16_supported,
        "Whether linear_bf16_cpu runs here (AVX512-BF16, not capped by MVMAE_FAST_CPU_ISA)");
  m.def(
      "linear_bf16_cpu",
      [](uintptr_t a, uintptr_t w, uintptr_t b, uintptr_t wb, int64_t rows, int64_t K, int64_t N, int epilogue,
         uintptr_t out, uintptr_t deriv, uintptr_t residual, int threads) {
        py::gil_scoped_release release;
        linear_bf16_cpu(ptr<const uint16_t>(a), ptr<const float>(w), ptr<const float>(b), ptr<uint16_t>(wb), rows, K,
                        N, epilogue, reinterpret_cast<void*>(out), ptr<uint16_t>(deriv), ptr<const float>(residual),
                        threads);
      },
      py::arg("a"), py::arg("w"), py::arg("b"), py::arg("wb"), py::arg("rows"), py::arg("K"), py::arg("N"),
      py::arg("epilogue"), py::arg("out"), py::arg("deriv"), py::arg("residual"), py::arg("threads"));
  m.def(
      "linear_bf16_backward_input_cpu",
      [](uintptr_t g, uintptr_t wb, int64_t rows, int64_t N, int64_t K, uintptr_t out, bool gelu, uintptr_t deriv,
         uintptr_t colsum, int threads) {
        py::gil_scoped_release release;
        linear_bf16_backward_input_cpu(ptr<const uint16_t>(g), ptr<const uint16_t>(wb), rows, N, K, ptr<uint16_t>(out),
                                       gelu, ptr<const uint16_t>(deriv), ptr<float>(colsum), threads);
      },
      py::arg("g"), py::arg("wb"), py::arg("rows"), py::arg("N"), py::arg("K"), py::arg("out"), py::arg("gelu"),
      py::arg("deriv"), py::arg("colsum"), py::arg("threads"));
  m.def(
      "linear_bf16_backward_weight_cpu",
      [](uintptr_t g, uintptr_t x, int64_t rows, int64_t N, int64_t K, uintptr_t dw, int threads) {
        py::gil_scoped_release release;
        linear_bf16_backward_weight_cpu(ptr<const uint16_t>(g), ptr<const uint16_t>(x), rows, N, K, ptr<float>(dw),
                                        threads);
      },
      py::arg("g"), py::arg("x"), py::arg("rows"), py::arg("N"), py::arg("K"), py::arg("dw"), py::arg("threads"));
  m.def(
      "gelu_bf16_backward_cpu",
      [](uintptr_t dact, uintptr_t deriv, uintptr_t dpre, uintptr_t colsum, int64_t rows, int64_t cols, int threads) {
        py::gil_scoped_release release;
        gelu_bf16_backward_cpu(ptr<const uint16_t>(dact), ptr<const uint16_t>(deriv), ptr<uint16_t>(dpre),
                               ptr<float>(colsum), rows, cols, threads);
      },
      py::arg("dact"), py::arg("deriv"), py::arg("dpre"), py::arg("colsum"), py::arg("rows"), py::arg("cols"),
      py::arg("threads"));
  m.def(
      "layer_norm_bf16_backward_cpu",
      [](uintptr_t dy, uintptr_t x, uintptr_t mean, uintptr_t rstd, uintptr_t gamma, uintptr_t residual, uintptr_t dx,
         uintptr_t dgamma, uintptr_t dbeta, int64_t rows, int64_t dim, int threads) {
        py::gil_scoped_release release;
        layer_norm_bf16_backward_cpu(ptr<const uint16_t>(dy), ptr<const float>(x), ptr<const float>(mean),
                                     ptr<const float>(rstd), ptr<const float>(gamma), ptr<const float>(residual),
                                     ptr<float>(dx), ptr<float>(dgamma), ptr<float>(dbeta), rows, dim, threads);
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("gamma"), py::arg("residual"),
      py::arg("dx"), py::arg("dgamma"), py::arg("dbeta"), py::arg("rows"), py::arg("dim"), py::arg("threads"));

  m.def(
      "colsum_bf16_cpu",
      [](uintptr_t g, uintptr_t colsum, int64_t rows, int64_t cols, int threads) {
        py::gil_scoped_release release;
        colsum_bf16_cpu(ptr<const uint16_t>(g), ptr<float>(colsum), rows, cols, threads);
      },
      py::arg("g"), py::arg("colsum"), py::arg("rows"), py::arg("cols"), py::arg("threads"));
  m.def(
      "add_bf16_cpu",
      [](uintptr_t x, uintptr_t y, uintptr_t out, int64_t numel, int threads) {
        py::gil_scoped_release release;
        add_bf16_cpu(ptr<const float>(x), ptr<const uint16_t>(y), ptr<float>(out), numel, threads);
      },
      py::arg("x"), py::arg("y"), py::arg("out"), py::arg("numel"), py::arg("threads"));

  m.def(
      "decoder_unshuffle_forward_cpu",
      [](uintptr_t x, int x_dtype, uintptr_t ids, int index_bytes, uintptr_t token, uintptr_t pos, uintptr_t out,
         int64_t batch, int64_t num_visible, int64_t num_patches, int64_t dim, int threads) {
        check_cpu_dtype(x_dtype);
        check_index_bytes(index_bytes);
        run_checked("decoder_unshuffle", [&] {
          return decoder_unshuffle_forward_cpu(ptr<const void>(x), x_dtype, ptr<const void>(ids), index_bytes,
                                               ptr<const float>(token), ptr<const float>(pos), ptr<float>(out),
                                               batch, num_visible, num_patches, dim, threads);
        });
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ids"), py::arg("index_bytes"), py::arg("token"), py::arg("pos"),
      py::arg("out"), py::arg("batch"), py::arg("num_visible"), py::arg("num_patches"), py::arg("dim"),
      py::arg("threads"));
  m.def(
      "decoder_unshuffle_backward_cpu",
      [](uintptr_t grad, uintptr_t ids, int index_bytes, uintptr_t grad_x, int x_dtype, uintptr_t grad_token,
         int64_t batch, int64_t num_visible, int64_t num_patches, int64_t dim, int threads) {
        check_cpu_dtype(x_dtype);
        check_index_bytes(index_bytes);
        run_checked("decoder_unshuffle_backward", [&] {
          return decoder_unshuffle_backward_cpu(ptr<const float>(grad), ptr<const void>(ids), index_bytes,
                                                ptr<void>(grad_x), x_dtype, ptr<float>(grad_token), batch,
                                                num_visible, num_patches, dim, threads);
        });
      },
      py::arg("grad"), py::arg("ids"), py::arg("index_bytes"), py::arg("grad_x"), py::arg("x_dtype"),
      py::arg("grad_token"), py::arg("batch"), py::arg("num_visible"), py::arg("num_patches"), py::arg("dim"),
      py::arg("threads"));
  m.def(
      "recon_rows_forward_cpu",
      [](uintptr_t pred, int pred_dtype, uintptr_t imgs, std::array<int64_t, 5> strides, uintptr_t ids,
         int index_bytes, uintptr_t sums, int64_t views, int64_t batch, int64_t channels, int64_t width,
         int64_t patch, int64_t rows, bool norm, int threads) {
        check_cpu_dtype(pred_dtype);
        check_index_bytes(index_bytes);
        run_checked("masked_recon_loss_rows", [&] {
          return recon_rows_forward_cpu(ptr<const void>(pred), pred_dtype, ptr<const float>(imgs), strides.data(),
                                        ptr<const void>(ids), index_bytes, ptr<double>(sums), views, batch,
                                        channels, width, patch, rows, norm, threads);
        });
      },
      py::arg("pred"), py::arg("pred_dtype"), py::arg("imgs"), py::arg("strides"), py::arg("ids"),
      py::arg("index_bytes"), py::arg("sums"), py::arg("views"), py::arg("batch"), py::arg("channels"),
      py::arg("width"), py::arg("patch"), py::arg("rows"), py::arg("norm"), py::arg("threads"));
  m.def(
      "recon_rows_backward_cpu",
      [](uintptr_t scale, uintptr_t pred, int pred_dtype, uintptr_t imgs, std::array<int64_t, 5> strides,
         uintptr_t ids, int index_bytes, uintptr_t grad, int64_t views, int64_t batch, int64_t channels,
         int64_t width, int64_t patch, int64_t rows, bool norm, int threads) {
        check_cpu_dtype(pred_dtype);
        check_index_bytes(index_bytes);
        run_checked("masked_recon_loss_rows_backward", [&] {
          return recon_rows_backward_cpu(ptr<const float>(scale), ptr<const void>(pred), pred_dtype,
                                         ptr<const float>(imgs), strides.data(), ptr<const void>(ids), index_bytes,
                                         ptr<void>(grad), views, batch, channels, width, patch, rows, norm,
                                         threads);
        });
      },
      py::arg("scale"), py::arg("pred"), py::arg("pred_dtype"), py::arg("imgs"), py::arg("strides"), py::arg("ids"),
      py::arg("index_bytes"), py::arg("grad"), py::arg("views"), py::arg("batch"), py::arg("channels"),
      py::arg("width"), py::arg("patch"), py::arg("rows"), py::arg("norm"), py::arg("threads"));
  m.def("fused_layers_isa", [] { return std::string(fused_layers_isa()); });

#ifdef MVMAE_FAST_WITH_CUDA
  m.def(
      "random_masking_cuda",
      [](uintptr_t ids_keep, uintptr_t ids_restore, uintptr_t mask, int64_t batch,
         int64_t num_patches, int64_t keep, uint32_t s0, uint32_t s1, uintptr_t stream) {
        raise_cuda(random_masking_cuda(ptr<int64_t>(ids_keep), ptr<int64_t>(ids_restore),
                                       ptr<float>(mask), batch, num_patches, keep, s0, s1, stream),
                   "random_masking");
      },
      py::arg("ids_keep"), py::arg("ids_restore"), py::arg("mask"), py::arg("batch"),
      py::arg("num_patches"), py::arg("keep"), py::arg("s0"), py::arg("s1"), py::arg("stream"));

  m.def(
      "gather_rows_cuda",
      [](uintptr_t x, uintptr_t ids, int index_bytes, uintptr_t out, int64_t batch,
         int64_t num_rows, int64_t num_ids, int64_t row_bytes, uintptr_t stream) {
        check_index_bytes(index_bytes);
        raise_cuda(gather_rows_cuda(ptr<const void>(x), ptr<const void>(ids), index_bytes,
                                    ptr<void>(out), batch, num_rows, num_ids, row_bytes, stream),
                   "gather_rows");
      },
      py::arg("x"), py::arg("ids"), py::arg("index_bytes"), py::arg("out"), py::arg("batch"),
      py::arg("num_rows"), py::arg("num_ids"), py::arg("row_bytes"), py::arg("stream"));

  m.def(
      "scatter_rows_cuda",
      [](uintptr_t y, uintptr_t ids, int index_bytes, uintptr_t out, int64_t batch,
         int64_t num_rows, int64_t num_ids, int64_t row_bytes, uintptr_t stream) {
        check_index_bytes(index_bytes);
        raise_cuda(scatter_rows_cuda(ptr<const void>(y), ptr<const void>(ids), index_bytes,
                                     ptr<void>(out), batch, num_rows, num_ids, row_bytes, stream),
                   "scatter_rows");
      },
      py::arg("y"), py::arg("ids"), py::arg("index_bytes"), py::arg("out"), py::arg("batch"),
      py::arg("num_rows"), py::arg("num_ids"), py::arg("row_bytes"), py::arg("stream"));
#endif
}
