// The training ops' shape checks (train_checks.h) and the Backend defaults, which say the op is
// missing rather than compute anything.
#include <cmath>

#include "backend/backend.h"
#include "backend/train_checks.h"
#include "kernels/ref/router_ref.h"

namespace hm {

namespace train_check {
namespace {
std::string dims(const Tensor& t) { return detail::cat("[", t.rows, ", ", t.cols, "]"); }
}  // namespace

void linear_backward(const std::string& be, Tensor dx, Tensor dW, Tensor dy, Tensor x, Tensor W) {
  HM_CHECK(dy.rows == x.rows && dy.cols == W.rows && x.cols == W.cols && dW.rows == W.rows &&
               dW.cols == W.cols && (dx.empty() || (dx.rows == x.rows && dx.cols == x.cols)),
           be, " linear_backward: dy ", dims(dy), ", x ", dims(x), ", W ", dims(W), ", dW ",
           dims(dW), ", dx ", dims(dx), " do not fit y = x W^T");
}

void rmsnorm_backward(const std::string& be, Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w) {
  HM_CHECK(dx.rows == x.rows && dx.cols == x.cols && dout.rows == x.rows && dout.cols == x.cols &&
               w.cols == x.cols && dw.cols == x.cols && w.rows == 1 && dw.rows == 1,
           be, " rmsnorm_backward: dx ", dims(dx), ", dout ", dims(dout), ", x ", dims(x), ", w ",
           dims(w), ", dw ", dims(dw), " do not fit");
}

void swiglu_backward(const std::string& be, Tensor dg, Tensor du, Tensor dout, Tensor g, Tensor u) {
  for (const Tensor* t : {&dg, &du, &dout, &u})
    HM_CHECK(t->rows == g.rows && t->cols == g.cols, be, " swiglu_backward: dg ", dims(dg), ", du ",
             dims(du), ", dout ", dims(dout), ", g ", dims(g), ", u ", dims(u), " must be one shape");
}

void relu2_backward(const std::string& be, Tensor dx, Tensor dout, Tensor x) {
  HM_CHECK(dx.rows == x.rows && dx.cols == x.cols && dout.rows == x.rows && dout.cols == x.cols, be,
           " relu2_backward: dx ", dims(dx), ", dout ", dims(dout), ", x ", dims(x), " must be one shape");
}

void conv1d_silu(const std::string& be, const char* op, Tensor out, Tensor x, Tensor w, Tensor b,
                 const Ragged& rg) {
  HM_CHECK(out.rows == x.rows && out.cols == x.cols && x.rows == rg.n_tokens() && w.rows == x.cols &&
               w.cols >= 1 && b.cols == x.cols,
           be, " ", op, ": out ", dims(out), ", x ", dims(x), ", w ", dims(w), ", b ", dims(b),
           ", batch of ", rg.n_tokens(), " tokens do not fit");
}

void selective_scan(const std::string& be, const char* op, Tensor y, Tensor x, Tensor dt,
                    Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                    const Ragged& rg) {
  const int E = x.cols, N = B.cols, n = x.rows;
  HM_CHECK(n == rg.n_tokens() && y.rows == n && dt.rows == n && z.rows == n && B.rows == n &&
               C.rows == n && y.cols == E && dt.cols == E && z.cols == E && C.cols == N && N >= 1 &&
               dt_bias.cols == E && Dskip.cols == E && A_log.rows == E && A_log.cols == N,
           be, " ", op, ": x ", dims(x), ", y ", dims(y), ", dt ", dims(dt), ", z ", dims(z), ", B ",
           dims(B), ", C ", dims(C), ", A_log ", dims(A_log), ", dt_bias ", dt_bias.cols, ", Dskip ",
           Dskip.cols, ", batch of ", rg.n_tokens(), " tokens do not fit");
}

void ssd_scan(const std::string& be, const char* op, Tensor y, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log,
              Tensor B, Tensor C, Tensor Dskip, int heads, int groups, const Ragged& rg) {
  const int n = x.rows;
  HM_CHECK(heads >= 1 && groups >= 1 && heads % groups == 0 && x.cols % heads == 0 && B.cols % groups == 0 &&
               B.cols >= groups && n == rg.n_tokens() && y.rows == n && dt.rows == n && B.rows == n &&
               C.rows == n && y.cols == x.cols && dt.cols == heads && C.cols == B.cols && dt_bias.cols == heads &&
               A_log.cols == heads && Dskip.cols == heads && A_log.dtype == DType::F32,
           be, " ", op, ": x ", dims(x), ", y ", dims(y), ", dt ", dims(dt), ", B ", dims(B), ", C ", dims(C),
           ", dt_bias ", dims(dt_bias), ", A_log ", dims(A_log), " (", compute_dtype_name(A_log.dtype), "), Dskip ",
           dims(Dskip), ", ", heads, " heads in ", groups, " groups, batch of ", rg.n_tokens(), " tokens do not fit");
}

void gated_rmsnorm(const std::string& be, const char* op, Tensor out, Tensor y, Tensor z, Tensor w, int group) {
  HM_CHECK(group >= 1 && y.cols % group == 0 && out.rows == y.rows && out.cols == y.cols && z.rows == y.rows &&
               z.cols == y.cols && w.rows == 1 && w.cols == y.cols,
           be, " ", op, ": out ", dims(out), ", y ", dims(y), ", z ", dims(z), ", w ", dims(w), ", group ", group,
           " do not fit");
}

void same_shape(const std::string& be, const char* op, const char* name, Tensor grad, Tensor of) {
  HM_CHECK(grad.rows == of.rows && grad.cols == of.cols, be, " ", op, ": ", name, " ", dims(grad),
           " must have its input's shape ", dims(of));
}

void attention(const std::string& be, const char* op, Tensor out, Tensor lse, Tensor q, Tensor k,
               Tensor v, int H, int G, int hd, const Ragged& rg) {
  const int n = rg.n_tokens();
  HM_CHECK(H > 0 && G > 0 && hd > 0 && H % G == 0 && q.rows == n && out.rows == n && k.rows == n &&
               v.rows == n && lse.rows == n && q.cols == H * hd && out.cols == H * hd &&
               k.cols == G * hd && v.cols == G * hd && lse.cols == H,
           be, " ", op, ": q ", dims(q), ", k ", dims(k), ", v ", dims(v), ", out ", dims(out),
           ", lse ", dims(lse), " for ", H, " heads (", G, " kv) of ", hd, ", batch of ", n,
           " tokens do not fit");
}

void rope(const std::string& be, const char* op, Tensor x, int heads, int hd, const Ragged& rg) {
  HM_CHECK(heads > 0 && hd > 0 && hd % 2 == 0 && x.cols >= heads * hd && x.rows == rg.n_tokens(),
           be, " ", op, ": x ", dims(x), " for ", heads, " heads of ", hd, ", batch of ",
           rg.n_tokens(), " tokens");
}

void embedding_backward(const std::string& be, Tensor dtable, Tensor dout) {
  HM_CHECK(dtable.cols == dout.cols, be, " embedding_backward: dout ", dims(dout), " for a table ",
           dims(dtable));
}

void cross_entropy_head(const std::string& be, Tensor dhn, Tensor dW, Tensor hn, Tensor W) {
  HM_CHECK(hn.cols == W.cols && dhn.rows == hn.rows && dhn.cols == hn.cols && dW.rows == W.rows &&
               dW.cols == W.cols && W.rows >= 1,
           be, " cross_entropy_head: hn ", dims(hn), ", W ", dims(W), ", dhn ", dims(dhn), ", dW ",
           dims(dW), " do not fit");
}

void scale_cols_backward(const std::string& be, Tensor dsrc, Tensor dscale, Tensor ddst, Tensor src,
                         Tensor scale) {
  HM_CHECK(dsrc.rows == src.rows && dsrc.cols == src.cols && ddst.rows == src.rows && ddst.cols == src.cols &&
               scale.rows == 1 && scale.cols == src.cols && dscale.rows == 1 && dscale.cols == src.cols,
           be, " scale_cols_backward: dsrc ", dims(dsrc), ", dscale ", dims(dscale), ", ddst ", dims(ddst), ", src ",
           dims(src), ", scale ", dims(scale), " do not fit dst += src * scale");
}

void row_dots(const std::string& be, Tensor out, Tensor a, Tensor b) {
  HM_CHECK(a.cols == b.cols && a.dtype == b.dtype && out.dtype == DType::F32 && out.rows == 1 && out.cols == b.rows,
           be, " row_dots: out ", dims(out), " ", compute_dtype_name(out.dtype), ", a ", dims(a), " ",
           compute_dtype_name(a.dtype), ", b ", dims(b), " ", compute_dtype_name(b.dtype),
           " do not fit out[r] = a[idx[r]] . b[r] (out float32 [1, b.rows]; a and b one type and width)");
}

void router(const std::string& be, Tensor r, Tensor feats, Tensor u, Tensor w, Tensor fw, Tensor b,
            const Ragged& rg, int chunk, const StatePool* st) {
  const int n = rg.n_tokens(), D = u.cols;
  const auto f32_vec = [](Tensor t, int len) { return t.dtype == DType::F32 && t.rows == 1 && t.cols == len; };
  const bool feats_ok = !feats.data || (feats.dtype == DType::F32 && feats.rows == n && feats.cols == kRouterFeatures);
  HM_CHECK(u.rows == n && f32_vec(r, n) && feats_ok && f32_vec(w, D) && f32_vec(fw, kRouterFeatures) &&
               f32_vec(b, 1) && chunk >= 0,
           be, " router: r ", dims(r), ", feats ", dims(feats), ", u ", dims(u), ", w ", dims(w), ", fw ",
           dims(fw), ", b ", dims(b), ", chunk ", chunk, " do not fit ", n, " tokens (r, feats, w, fw, b float32)");
  if (!st) return;
  HM_CHECK(st->base && st->slot_stride == int64_t(D) + 1, be, " router: the analyzer state's slots hold ",
           st->slot_stride, " floats, not D + 1 = ", D + 1);
  for (int s = 0; s < rg.nseq(); ++s)
    HM_CHECK(rg.slot(s) >= 0 && rg.slot(s) < st->n_slots && rg.pos0(s) >= 0, be, " router: sequence ", s,
             " is in slot ", rg.slot(s), " at position ", rg.pos0(s), " (", st->n_slots, " slots)");
}

void convert(const std::string& be, Tensor dst, Tensor src) {
  HM_CHECK(dst.rows == src.rows && dst.cols == src.cols && !is_packed(dst.dtype) && !is_packed(src.dtype), be,
           " convert: dst ", dims(dst), " ", compute_dtype_name(dst.dtype), " and src ", dims(src), " ",
           compute_dtype_name(src.dtype), " must be one shape of unpacked types");
}

void spans(const std::string& be, const char* op, const std::vector<Backend::ArenaSpan>& sp) {
  for (size_t i = 0; i < sp.size(); ++i)
    HM_CHECK(sp[i].offset >= 0 && sp[i].n >= 0 && std::isfinite(sp[i].weight_decay), be, " ", op, ": span ", i,
             " (offset ", sp[i].offset, ", n ", sp[i].n, ", weight decay ", sp[i].weight_decay, ") is invalid");
}

}  // namespace train_check

namespace {
[[noreturn]] void missing(const Backend& be, const char* op) {
  throw Error(detail::cat(be.name(), ": ", op, " is not implemented on this backend yet (training ops, issue 15)"));
}
}  // namespace

void Backend::linear_backward(Tensor, Tensor, Tensor, Tensor, Tensor, bool) { missing(*this, "linear_backward"); }
void Backend::rmsnorm_backward(Tensor, Tensor, Tensor, Tensor, Tensor, float, bool) {
  missing(*this, "rmsnorm_backward");
}
void Backend::swiglu_backward(Tensor, Tensor, Tensor, Tensor, Tensor) { missing(*this, "swiglu_backward"); }
void Backend::relu2_backward(Tensor, Tensor, Tensor) { missing(*this, "relu2_backward"); }
void Backend::conv1d_silu_train(Tensor, Tensor, Tensor, Tensor, const Ragged&) {
  missing(*this, "conv1d_silu_train");
}
void Backend::conv1d_silu_backward(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, const Ragged&) {
  missing(*this, "conv1d_silu_backward");
}
size_t Backend::scan_saved_bytes(const Ragged&, int, int, int) const { missing(*this, "scan_saved_bytes"); }
void Backend::selective_scan_train(Tensor, void*, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                   Tensor, Tensor, int, const Ragged&) {
  missing(*this, "selective_scan_train");
}
void Backend::selective_scan_backward(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                      Tensor, const void*, Tensor, Tensor, Tensor, Tensor, Tensor,
                                      Tensor, Tensor, Tensor, int, const Ragged&) {
  missing(*this, "selective_scan_backward");
}
void Backend::ssd_scan_train(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int, float, float,
                             const Ragged&) {
  missing(*this, "ssd_scan_train");
}
void Backend::ssd_scan_backward(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                Tensor, Tensor, Tensor, Tensor, int, int, float, float, const Ragged&) {
  missing(*this, "ssd_scan_backward");
}
void Backend::gated_rmsnorm_backward(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, float) {
  missing(*this, "gated_rmsnorm_backward");
}
void Backend::attention_train(Tensor, Tensor, Tensor, Tensor, Tensor, int, int, int, const Ragged&) {
  missing(*this, "attention_train");
}
void Backend::attention_backward(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                 Tensor, int, int, int, const Ragged&) {
  missing(*this, "attention_backward");
}
void Backend::rope_backward(Tensor, int, int, float, const Ragged&) { missing(*this, "rope_backward"); }
void Backend::embedding_backward(Tensor, Tensor, const int32_t*) { missing(*this, "embedding_backward"); }
double Backend::cross_entropy_head(Tensor, Tensor, Tensor, Tensor, const int32_t*, double) {
  missing(*this, "cross_entropy_head");
}
void Backend::scale_cols_backward(Tensor, Tensor, Tensor, Tensor, Tensor) { missing(*this, "scale_cols_backward"); }
void Backend::row_dots(Tensor, Tensor, const int32_t*, Tensor) { missing(*this, "row_dots"); }
void Backend::router(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, const Ragged&, int, const StatePool*) {
  missing(*this, "router");
}
void Backend::convert(Tensor, Tensor) { missing(*this, "convert"); }
double Backend::sum_squares(const float*, const std::vector<ArenaSpan>&) { missing(*this, "sum_squares"); }
void Backend::adamw_step(float*, const float*, float*, float*, const std::vector<ArenaSpan>&, const AdamWStep&) {
  missing(*this, "adamw_step");
}

}  // namespace hm
