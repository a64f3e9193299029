// Shape checks of the training ops (backend.h), shared by every backend so each op rejects the
// same calls with the same hm::Error: "<backend> <op>: ..." with the shapes it got.
#pragma once
#include <string>

#include <vector>

#include "backend/backend.h"
#include "backend/tensor.h"

namespace hm::train_check {

void linear_backward(const std::string& be, Tensor dx, Tensor dW, Tensor dy, Tensor x, Tensor W);
void rmsnorm_backward(const std::string& be, Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w);
void swiglu_backward(const std::string& be, Tensor dg, Tensor du, Tensor dout, Tensor g, Tensor u);
void relu2_backward(const std::string& be, Tensor dx, Tensor dout, Tensor x);
// Conv forward (dx, dw, db empty) or backward.
void conv1d_silu(const std::string& be, const char* op, Tensor out, Tensor x, Tensor w, Tensor b,
                 const Ragged& rg);
// Every tensor of the scan forward; the backward checks each gradient against its input too.
void selective_scan(const std::string& be, const char* op, Tensor y, Tensor x, Tensor dt,
                    Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                    const Ragged& rg);
// Every tensor of the SSD scan (y, x [n, heads * P]; dt [n, heads]; B, C [n, groups * N];
// dt_bias, A_log, Dskip [1, heads]).
void ssd_scan(const std::string& be, const char* op, Tensor y, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log,
              Tensor B, Tensor C, Tensor Dskip, int heads, int groups, const Ragged& rg);
// The gated RMSNorm's (out, y, z [n, E]; w [1, E]; group divides E).
void gated_rmsnorm(const std::string& be, const char* op, Tensor out, Tensor y, Tensor z, Tensor w, int group);
void same_shape(const std::string& be, const char* op, const char* name, Tensor grad, Tensor of);
void attention(const std::string& be, const char* op, Tensor out, Tensor lse, Tensor q, Tensor k,
               Tensor v, int H, int G, int hd, const Ragged& rg);
void rope(const std::string& be, const char* op, Tensor x, int heads, int hd, const Ragged& rg);
void embedding_backward(const std::string& be, Tensor dtable, Tensor dout);
void cross_entropy_head(const std::string& be, Tensor dhn, Tensor dW, Tensor hn, Tensor W);
void scale_cols_backward(const std::string& be, Tensor dsrc, Tensor dscale, Tensor ddst, Tensor src, Tensor scale);
void row_dots(const std::string& be, Tensor out, Tensor a, Tensor b);
void router(const std::string& be, Tensor r, Tensor feats, Tensor u, Tensor w, Tensor fw, Tensor b,
            const Ragged& rg, int chunk, const StatePool* st);
void convert(const std::string& be, Tensor dst, Tensor src);
void spans(const std::string& be, const char* op, const std::vector<Backend::ArenaSpan>& sp);

}  // namespace hm::train_check
