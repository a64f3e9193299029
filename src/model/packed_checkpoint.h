// Checkpoints whose linear weights are stored packed (issue 17; the layout: docs/QUANTIZATION.md).
// model.safetensors names the format in its metadata, "hm.weight_format" = "bf16" | "f16" |
// "q8_0" | "q4_0", and stores each weight the model packed (HybridModel::packed_weights) as
//  - bf16 / f16: a BF16 / F16 tensor of its own shape [n, k] (the other 16-bit type is an error);
//  - q8_0 / q4_0: a U8 tensor [n, row_bytes(k)]: its packed rows, byte for byte (kernels/quant.h);
// every other tensor as F32. load_params reads such a file into the float32 arena (packed rows
// dequantized) and returns the format, and prepare() packs the same rows again: quantizing a
// dequantized q8_0 / q4_0, bf16 or f16 row gives back its values, so the loaded model computes
// what the saved one did.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "core/dtype.h"
#include "io/safetensors.h"
#include "model/params.h"

namespace hm {

class Backend;
class HybridModel;

constexpr const char* kWeightFormatKey = "hm.weight_format";

// The format a checkpoint's metadata names: F32 when it names none; hm::Error naming the file,
// the key and the value for anything but bf16, f16, q8_0 and q4_0.
DType checkpoint_weight_format(const SafetensorsReader& r);

// Reads tensor t of a checkpoint whose metadata names `format` into dst, the float32 spec s:
// U8 packed rows by read_packed_tensor, anything else by read_f32. In a bf16 or f16 checkpoint
// a tensor stored in the other 16-bit type is an hm::Error naming the file and the tensor
// (reading it would round the weights again: not the model that was saved).
void read_weight_tensor(const SafetensorsReader& r, const TensorInfo& t, const ParamSpec& s, DType format,
                        float* dst);

// Reads tensor t (stored as U8 packed rows) into dst, the float32 [rows, cols] of spec s.
// Checks, before allocating anything, that the checkpoint's format is q8_0 or q4_0 and that t
// is [rows, row_bytes(cols)]; hm::Error naming the file and the tensor otherwise.
void read_packed_tensor(const SafetensorsReader& r, const TensorInfo& t, const ParamSpec& s, DType format,
                        float* dst);

// model.safetensors of a model whose weight_format() is not F32, written atomically.
void save_packed_params(const HybridModel& m, const std::string& path);

// Inference only: our checkpoint in dir (f32 or packed) loaded with its linear weights in
// `format` (bf16 | f16 | q8_0 | q4_0) on a CPU backend computing in float32, packing each weight as it
// is read, so the float32 copy of a packed weight is never resident (one tensor at a time);
// prepared, with release_float_weights() done. The same checks as load_params (unexpected or
// missing tensors, shapes, non-finite values, packed layout), hm::Error naming the file.
std::unique_ptr<HybridModel> load_packed_for_inference(const std::string& dir, Backend& be, DType format);
// The weight format a checkpoint folder's model.safetensors names (F32 when none).
DType stored_weight_format(const std::string& dir);

}  // namespace hm
